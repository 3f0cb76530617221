"""WSN — Winning SubNetworks (Kang et al., ICML 2022), the parameter-isolation baseline of IBM.

As the authors' code (ihaeyong/WSN, ``networks/subnet.py`` and ``main_wsn_*.py``) runs it:

* One real-valued score tensor per masked weight (``shared["scores"]``), initialised like the weights
  (``kaiming_uniform(a=sqrt(5))``: uniform in ``+-1/sqrt(fan_in)``) and carried over from task to
  task: task ``t`` starts from task ``t-1``'s scores, so its first mask is task ``t-1``'s mask, which
  is how a task reuses earlier tasks' weights. The scores are trained at every position in every task
  (only the weights are frozen where consolidated).
* Task ``t``'s mask keeps the top ``c`` fraction of ``|scores|`` of each layer
  (:func:`clax.transforms.binary_mask.top_fraction`, the authors' percentile rule, ties kept), with a
  straight-through gradient through the absolute value (``dL/ds = g * sign(s)``). The network of task
  ``t`` is ``W * m_t``.
* After the task, ``m_t`` is stored bit-packed (``extra["packed"]``, one row of bytes per task;
  predictions read it back; before the task's end, i.e. validation, ``eval.every_epoch`` and the
  best-epoch choice during its epochs, they use the top-c of the live scores,
  :func:`clax.transforms.binary_mask.live_or_stored`) and joins the consolidated union: those weights are reused by later tasks
  but never updated again. Per task only the bit mask, the head and the task's biases and BatchNorm
  parameters are stored; the scores are one live tensor, not stored per task.

Composition: the masked network of :mod:`clax.transforms.consolidation` with the mask
:func:`clax.transforms.binary_mask.top_c`, then the transforms ``packed`` (the bit-packed per-task
masks), ``consolidation`` (the union frozen) and, with ``bn="refresh"``, ``bn_refresh``.

The setting ``c`` is the paper's kept fraction. The authors' ``--sparsity`` flag means the same (their
scripts turn it into the dropped fraction ``1 - c`` before building the layers, whose own ``sparsity``
is the dropped fraction); clax names it ``c`` so that neither reading is possible.
``bn`` decides which BatchNorm statistics a task is tested with
(:data:`clax.transforms.consolidation.BN_MODES`): by default they are re-estimated at the end of the
task with its final mask; ``"batch"`` is the authors' (test-batch statistics).
"""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import FRACTION, REGEX, check_settings, one_of
from clax.transforms import batchnorm, binary_mask, consolidation

WSN_DEFAULTS = {"c": 0.5, "layers": r"kernel$", "bn": "refresh"}
WSN_RULES = {"c": FRACTION, "layers": REGEX, "bn": one_of(*consolidation.BN_MODES)}
#: one line per setting, as ``clax list wsn`` prints it
WSN_HELP = {"c": "fraction of each layer's weights a task's binary mask keeps (the paper's c)",
            "layers": "regular expression over backbone parameter paths: the masked weights",
            "bn": "test-time BatchNorm statistics: re-estimated per task, of the test batch, or running"}


def wsn(ctx: Context, **settings) -> Method:
    """WSN with settings ``c`` (kept fraction of each layer's scores, the paper's c, in (0, 1)),
    ``layers`` (regex over backbone parameter paths choosing the masked weights) and ``bn`` (test-time
    BatchNorm statistics: refresh | batch | running)."""
    s = check_settings("wsn", WSN_DEFAULTS, settings, WSN_RULES)
    c = binary_mask.check_fraction("wsn.c", s["c"])
    bn = consolidation.check_bn("wsn.bn", s["bn"])
    mask = binary_mask.top_c(c)
    refresh = [batchnorm.refresh(ctx, mask.test)] if bn == "refresh" else []
    return chain(consolidation.model(ctx, mask, s["layers"], bn, name="wsn"),
                 binary_mask.packed(c, ctx.num_tasks),
                 consolidation.freeze(mask, ctx.num_tasks),
                 *refresh, name="wsn", evaluates_unseen=False)
