"""PackNet (Mallya & Lazebnik, CVPR 2018): train, prune by magnitude, retrain, freeze.

Every masked weight has an owner (``extra["prune"]["owner"]``, int32 of the weights' shapes): 0 = free,
``k + 1`` = task ``k``. At the start of task ``t`` every free weight is given to ``t``; the network
of task ``t`` is ``W * [1 <= owner <= t + 1]`` (its own weights and all earlier tasks', frozen).
After ``prune_after`` epochs (or at the end of the task, whichever comes first) the ``prune``
fraction of task ``t``'s own weights with the smallest magnitude is released (owner 0, value 0) and
the remaining epochs retrain the survivors. Only weights owned by the current task are updated.

BatchNorm (``bn``): when pruning comes after the last epoch (``prune_after >= epochs``) no retraining
adapts the running statistics to the pruned network, and retraining adapts them only partly (a moving
average). By default (``"refresh"``) task ``t``'s statistics are re-estimated at the end of the task
with its final network (:func:`clax.transforms.consolidation.refresh_task`); ``"batch"`` uses each test
batch's statistics, ``"running"`` the training ones.

Composition: the masked network of :mod:`clax.transforms.consolidation` with the mask
:func:`clax.transforms.prune.owned`, then the transforms ``prune`` (owners, prune and retrain),
``consolidation`` (the union of task masks, frozen: every owned weight) and, with ``bn="refresh"``,
``bn_refresh``.
"""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import FRACTION, POSITIVE_INT, REGEX, check_settings, one_of
from clax.transforms import batchnorm, binary_mask, consolidation, prune

PACKNET_DEFAULTS = {"prune": 0.5, "prune_after": 7, "layers": r"kernel$", "bn": "refresh"}
PACKNET_RULES = {"prune": FRACTION, "prune_after": POSITIVE_INT, "layers": REGEX,
                 "bn": one_of(*consolidation.BN_MODES)}
#: one line per setting, as ``clax list packnet`` prints it
PACKNET_HELP = {"prune": "fraction of the task's free weights released by magnitude pruning",
                "prune_after": "epochs before pruning; the task's remaining epochs retrain",
                "layers": "regular expression over backbone parameter paths: the masked weights",
                "bn": "test-time BatchNorm statistics: re-estimated per task, of the test batch, or running"}


def packnet(ctx: Context, **settings) -> Method:
    """PackNet with settings ``prune`` (fraction of a task's weights released, in (0, 1)),
    ``prune_after`` (epochs before pruning; the rest retrain), ``layers`` (masked weights' regex) and
    ``bn`` (test-time BatchNorm statistics: refresh | batch | running)."""
    s = check_settings("packnet", PACKNET_DEFAULTS, settings, PACKNET_RULES)
    fraction = binary_mask.check_fraction("packnet.prune", s["prune"])
    if int(s["prune_after"]) < 1:
        raise ValueError(f"packnet.prune_after must be >= 1 epoch, got {s['prune_after']}")
    bn = consolidation.check_bn("packnet.bn", s["bn"])
    mask = prune.owned()
    refresh = [batchnorm.refresh(ctx, mask.test)] if bn == "refresh" else []
    return chain(consolidation.model(ctx, mask, s["layers"], bn, name="packnet"),
                 prune.packnet(fraction, int(s["prune_after"]), ctx.num_tasks),
                 consolidation.freeze(mask, ctx.num_tasks),
                 *refresh, name="packnet", evaluates_unseen=False)
