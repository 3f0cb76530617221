"""WSN — Winning SubNetworks (Kang et al., ICML 2022), the parameter-isolation baseline of IBM.

Each task ``t`` learns real-valued scores beside every masked weight (``per_task["scores"]``, one row
per task); its binary mask keeps the top ``sparsity`` fraction of ``|scores|`` of each layer (the
name and meaning of WSN's code: the kept fraction, the paper's ``c``), with a straight-through
gradient to the scores. The network of task ``t`` is ``W * m_t``. After the task, ``m_t`` is stored
bit-packed (``extra["packed"]``, one row of bytes per task; predictions read it back) and joins the
consolidated union: those weights are reused by later tasks but never updated again.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clax import partition as P
from clax.methods.base import Context, Method, TaskData
from clax.transforms import binary_mask, classifier, consolidation

WSN_DEFAULTS = {"sparsity": 0.5, "layers": r"kernel$"}


def _packed_layout(weights):
    """Per-layer byte offsets of the bit-packed masks in one row of ``extra["packed"]``."""
    sizes = [binary_mask.packed_nbytes(w.shape) for w in jax.tree.leaves(weights)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def wsn(ctx: Context, **settings) -> Method:
    """WSN with settings ``sparsity`` (kept fraction per layer, in (0, 1)) and ``layers`` (regex over
    backbone parameter paths choosing the masked weights)."""
    s = {**WSN_DEFAULTS, **settings}
    c = binary_mask.check_fraction("wsn.sparsity", s["sparsity"])
    T = ctx.num_tasks

    def init(key):
        k_net, k_scores = jax.random.split(key)
        cl = consolidation.init(k_net, ctx, s["layers"])
        w = cl.shared["weights"]
        leaves, treedef = jax.tree.flatten(w)
        ks = jax.random.split(k_scores, len(leaves))
        # scores drawn like the weights (Kaiming-uniform-like scale), independently per task
        scores = [jax.random.uniform(k, (T,) + a.shape, a.dtype, -1.0, 1.0) * jnp.sqrt(3.0 / a.shape[-2])
                  if a.ndim >= 2 else jax.random.uniform(k, (T,) + a.shape, a.dtype, -1.0, 1.0)
                  for k, a in zip(ks, leaves)]
        layout = _packed_layout(w)
        return cl.replace(per_task={**cl.per_task, "scores": jax.tree.unflatten(treedef, scores)},
                          extra={**cl.extra, "packed": jnp.zeros((T, int(layout[-1])), jnp.uint8)})

    def train_masks(scores):
        return jax.tree.map(lambda sc: binary_mask.top_fraction_ste(sc, c), scores)

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
        m = train_masks(P.task_row(cl.per_task["scores"], t))
        w_eff = consolidation.apply_masks(cl.shared["weights"], m)
        logits, state = consolidation.forward(cl, ctx, w_eff, batch["x"], t, batch["tid"], train=True)
        ce = classifier.cross_entropy(logits, batch["y"])
        return ce, (state, {"loss": ce, "ce": ce})

    def predict(cl, x, tid):
        t = consolidation.batch_task(tid)
        w_eff = consolidation.apply_masks(cl.shared["weights"], stored_masks(cl, t))
        return consolidation.forward(cl, ctx, w_eff, x, t, tid, train=False)[0]

    def end_task(cl, data: TaskData):
        scores = P.task_row(cl.per_task["scores"], data.t)
        m = jax.tree.map(lambda sc: binary_mask.top_fraction(sc, c) > 0, scores)
        packed = np.concatenate([binary_mask.pack(a) for a in jax.tree.leaves(m)])
        extra = {**cl.extra, "consolidated": consolidation.consolidate(cl.extra["consolidated"], m),
                 "packed": cl.extra["packed"].at[data.t].set(jnp.asarray(packed))}
        return cl.replace(extra=extra)

    def report(cl):
        return consolidation.capacity_report([stored_masks(cl, t) for t in range(T)])

    def task_bytes(cl, t):
        return int(cl.extra["packed"].shape[1])

    return Method("wsn", init, loss, predict, end_task=end_task, update_mask=consolidation.update_mask,
                  evaluates_unseen=False, task_bytes=task_bytes, report=report)
