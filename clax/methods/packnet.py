"""PackNet (Mallya & Lazebnik, CVPR 2018): train, prune by magnitude, retrain, freeze.

Every masked weight has an owner (``extra["owner"]``, int32 of the weights' shapes): 0 = free,
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
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clax.methods.base import Context, Method, TaskData
from clax.settings import FRACTION, POSITIVE_INT, REGEX, check_settings, one_of
from clax.transforms import batchnorm, binary_mask, classifier, consolidation

PACKNET_DEFAULTS = {"prune": 0.5, "prune_after": 7, "layers": r"kernel$", "bn": "refresh"}
PACKNET_RULES = {"prune": FRACTION, "prune_after": POSITIVE_INT, "layers": REGEX,
                 "bn": one_of(*consolidation.BN_MODES)}


def packnet(ctx: Context, **settings) -> Method:
    """PackNet with settings ``prune`` (fraction of a task's weights released, in (0, 1)),
    ``prune_after`` (epochs before pruning; the rest retrain), ``layers`` (masked weights' regex) and
    ``bn`` (test-time BatchNorm statistics: refresh | batch | running)."""
    s = check_settings("packnet", PACKNET_DEFAULTS, settings, PACKNET_RULES)
    prune = binary_mask.check_fraction("packnet.prune", s["prune"])
    if int(s["prune_after"]) < 1:
        raise ValueError(f"packnet.prune_after must be >= 1 epoch, got {s['prune_after']}")
    bn = consolidation.check_bn("packnet.bn", s["bn"])
    T = ctx.num_tasks
    refresh = batchnorm.make_refresh(ctx.backbone.apply)

    def init(key):
        cl = consolidation.init(key, ctx, s["layers"], "packnet.layers")
        owner = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.int32), cl.shared["weights"])
        return cl.replace(extra={**cl.extra, "owner": owner, "pruned": jnp.zeros((T,), bool)})

    def task_mask(cl, t):
        """Bool tree: the weights that task ``t``'s network uses (owners 1..t+1)."""
        return jax.tree.map(lambda o: (o >= 1) & (o <= t + 1), cl.extra["owner"])

    def loss(cl, batch, key, t):
        w_eff = consolidation.apply_masks(cl.shared["weights"], task_mask(cl, t))
        logits, state = consolidation.forward(cl, ctx, w_eff, batch["x"], t, batch["tid"], train=True)
        ce = classifier.cross_entropy(logits, batch["y"])
        return ce, (state, {"loss": ce, "ce": ce})

    def predict(cl, x, tid):
        t = consolidation.batch_task(tid)
        w_eff = consolidation.apply_masks(cl.shared["weights"], task_mask(cl, t))
        return consolidation.forward(cl, ctx, w_eff, x, t, tid, train=False, bn=bn)[0]

    def update_mask(cl, t):
        base = consolidation.update_mask(cl, t)
        return {**base, "shared": {"weights": jax.tree.map(lambda o: o == t + 1, cl.extra["owner"])}}

    def begin_task(cl, data: TaskData):
        owner = jax.tree.map(lambda o: jnp.where(o == 0, data.t + 1, o), cl.extra["owner"])
        return cl.replace(extra={**cl.extra, "owner": owner})

    def do_prune(cl, t):
        """Releases the ``prune`` fraction of task ``t``'s own weights with the smallest ``|W|``."""
        o_leaves, treedef = jax.tree.flatten(cl.extra["owner"])
        w_leaves = jax.tree.leaves(cl.shared["weights"])
        new_o, new_w = [], []
        for o, w in zip(o_leaves, w_leaves):
            o, w = np.asarray(o), np.asarray(w)
            mine = o == t + 1
            n = int(mine.sum())
            k = int(round(prune * n))
            if k:
                order = np.argsort(np.where(mine, np.abs(w), np.inf), axis=None, kind="stable")[:k]
                release = np.zeros(o.size, bool)
                release[order] = True
                release = release.reshape(o.shape)
                o = np.where(release, 0, o)
                w = np.where(release, 0, w).astype(w.dtype)
            new_o.append(jnp.asarray(o))
            new_w.append(jnp.asarray(w))
        owner, weights = jax.tree.unflatten(treedef, new_o), jax.tree.unflatten(treedef, new_w)
        extra = {**cl.extra, "owner": owner, "pruned": cl.extra["pruned"].at[t].set(True)}
        return cl.replace(shared={**cl.shared, "weights": weights}, extra=extra)

    def end_epoch(cl, data: TaskData, epoch: int):
        if epoch + 1 == int(s["prune_after"]) and not bool(cl.extra["pruned"][data.t]):
            return do_prune(cl, data.t)
        return cl

    def end_task(cl, data: TaskData):
        if not bool(cl.extra["pruned"][data.t]):
            cl = do_prune(cl, data.t)
        cons = jax.tree.map(lambda o: o >= 1, cl.extra["owner"])
        cl = cl.replace(extra={**cl.extra, "consolidated": cons})
        if bn == "refresh":
            w_eff = consolidation.apply_masks(cl.shared["weights"], task_mask(cl, data.t))
            cl = consolidation.refresh_task(cl, ctx, refresh, w_eff, data.t, data.x, data.batch_size)
        return cl

    def report(cl):
        return consolidation.capacity_report([task_mask(cl, t) for t in range(T)])

    return Method("packnet", init, loss, predict, begin_task=begin_task, end_task=end_task,
                  update_mask=update_mask, end_epoch=end_epoch, evaluates_unseen=False, report=report)
