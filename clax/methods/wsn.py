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
  predictions read it back) and joins the consolidated union: those weights are reused by later tasks
  but never updated again. Per task only the bit mask, the head and the task's biases and BatchNorm
  parameters are stored; the scores are one live tensor, not stored per task.

The setting ``c`` is the paper's kept fraction. The authors' ``--sparsity`` flag means the same (their
scripts turn it into the dropped fraction ``1 - c`` before building the layers, whose own ``sparsity``
is the dropped fraction); clax names it ``c`` so that neither reading is possible.
``bn`` decides which BatchNorm statistics a task is tested with
(:data:`clax.transforms.consolidation.BN_MODES`): by default they are re-estimated at the end of the
task with its final mask; ``"batch"`` is the authors' (test-batch statistics).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from clax.methods.base import Context, Method, TaskData
from clax.settings import FRACTION, REGEX, check_settings, one_of
from clax.transforms import batchnorm, binary_mask, classifier, consolidation

WSN_DEFAULTS = {"c": 0.5, "layers": r"kernel$", "bn": "refresh"}
WSN_RULES = {"c": FRACTION, "layers": REGEX, "bn": one_of(*consolidation.BN_MODES)}


def _packed_layout(weights):
    """Per-layer byte offsets of the bit-packed masks in one row of ``extra["packed"]``."""
    sizes = [binary_mask.packed_nbytes(w.shape) for w in jax.tree.leaves(weights)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def init_scores(key, weights):
    """Scores of ``weights``' shapes drawn as the authors' ``kaiming_uniform_(w_m, a=sqrt(5))``:
    uniform in ``+-1/sqrt(fan_in)``, ``fan_in`` the product of a Flax kernel's dimensions but the last
    (inputs times the receptive field)."""
    leaves, treedef = jax.tree.flatten(weights)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, a in zip(keys, leaves):
        bound = 1.0 / math.sqrt(max(1, int(np.prod(a.shape[:-1]))))
        out.append(jax.random.uniform(k, a.shape, a.dtype, -bound, bound))
    return jax.tree.unflatten(treedef, out)


def wsn(ctx: Context, **settings) -> Method:
    """WSN with settings ``c`` (kept fraction of each layer's scores, the paper's c, in (0, 1)),
    ``layers`` (regex over backbone parameter paths choosing the masked weights) and ``bn`` (test-time
    BatchNorm statistics: refresh | batch | running)."""
    s = check_settings("wsn", WSN_DEFAULTS, settings, WSN_RULES)
    c = binary_mask.check_fraction("wsn.c", s["c"])
    bn = consolidation.check_bn("wsn.bn", s["bn"])
    T = ctx.num_tasks
    refresh = batchnorm.make_refresh(ctx.backbone.apply)

    def init(key):
        k_net, k_scores = jax.random.split(key)
        cl = consolidation.init(k_net, ctx, s["layers"], "wsn.layers")
        w = cl.shared["weights"]
        layout = _packed_layout(w)
        return cl.replace(shared={**cl.shared, "scores": init_scores(k_scores, w)},
                          extra={**cl.extra, "packed": jnp.zeros((T, int(layout[-1])), jnp.uint8)})

    def stored_masks(cl, t):
        """Task ``t``'s mask unpacked from its bit-packed row."""
        row = cl.extra["packed"][t]
        leaves, treedef = jax.tree.flatten(cl.shared["weights"])
        layout = _packed_layout(cl.shared["weights"])
        out = []
        for i, w in enumerate(leaves):
            bits = jnp.unpackbits(row[layout[i]:layout[i + 1]], count=w.size)
            out.append(bits.reshape(w.shape).astype(bool))
        return jax.tree.unflatten(treedef, out)

    def loss(cl, batch, key, t):
        m = jax.tree.map(lambda sc: binary_mask.top_fraction_ste(sc, c), cl.shared["scores"])
        w_eff = consolidation.apply_masks(cl.shared["weights"], m)
        logits, state = consolidation.forward(cl, ctx, w_eff, batch["x"], t, batch["tid"], train=True)
        ce = classifier.cross_entropy(logits, batch["y"])
        return ce, (state, {"loss": ce, "ce": ce})

    def predict(cl, x, tid):
        t = consolidation.batch_task(tid)
        w_eff = consolidation.apply_masks(cl.shared["weights"], stored_masks(cl, t))
        return consolidation.forward(cl, ctx, w_eff, x, t, tid, train=False, bn=bn)[0]

    def update_mask(cl, t):
        base = consolidation.update_mask(cl, t)
        scores = jax.tree.map(lambda a: jnp.ones(a.shape, bool), cl.shared["scores"])
        return {**base, "shared": {**base["shared"], "scores": scores}}

    def end_task(cl, data: TaskData):
        m = jax.tree.map(lambda sc: binary_mask.top_fraction(sc, c) > 0, cl.shared["scores"])
        packed = np.concatenate([binary_mask.pack(a) for a in jax.tree.leaves(m)])
        extra = {**cl.extra, "consolidated": consolidation.consolidate(cl.extra["consolidated"], m),
                 "packed": cl.extra["packed"].at[data.t].set(jnp.asarray(packed))}
        cl = cl.replace(extra=extra)
        if bn == "refresh":
            w_eff = consolidation.apply_masks(cl.shared["weights"], m)
            cl = consolidation.refresh_task(cl, ctx, refresh, w_eff, data.t, data.x, data.batch_size)
        return cl

    def report(cl):
        return consolidation.capacity_report([stored_masks(cl, t) for t in range(T)])

    def task_bytes(cl, t):
        return int(cl.extra["packed"].shape[1])

    return Method("wsn", init, loss, predict, end_task=end_task, update_mask=update_mask,
                  evaluates_unseen=False, task_bytes=task_bytes, report=report)
