"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

After each task the diagonal empirical Fisher information of the shared parameters is estimated from
per-sample gradients of the log-likelihood, summed over tasks, and the shared parameters are anchored:
``loss = CE + lambda / 2 * sum_i F_i (theta_i - theta*_i)^2``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.methods.base import Context, Method, TaskData
from clax.methods.finetune import classifier_method
from clax.settings import NON_NEGATIVE, POSITIVE_INT, check_settings
from clax.transforms import classifier

EWC_DEFAULTS = {"lambda": 1e5, "fisher_samples": 256}
EWC_RULES = {"lambda": NON_NEGATIVE, "fisher_samples": POSITIVE_INT}


def ewc(ctx: Context, **settings) -> Method:
    """EWC with settings ``lambda`` (penalty strength) and ``fisher_samples`` (per task)."""
    s = check_settings("ewc", EWC_DEFAULTS, settings, EWC_RULES)
    base = classifier_method("ewc", ctx)

    def init(key):
        cl = base.init(key)
        zeros = jax.tree.map(jnp.zeros_like, cl.shared)
        return cl.replace(extra={"fisher": zeros, "anchor": cl.shared})

    def penalty(cl):
        terms = jax.tree.map(lambda f, p, a: jnp.sum(f * (p - a) ** 2),
                             cl.extra["fisher"], cl.shared, cl.extra["anchor"])
        return 0.5 * s["lambda"] * sum(jax.tree.leaves(terms))

    def loss(cl, batch, key, t):
        ce, (state, metrics) = base.loss(cl, batch, key, t)
        reg = penalty(cl)
        return ce + reg, (state, {**metrics, "loss": ce + reg, "ewc": reg})

    @jax.jit
    def fisher_chunk(cl, x, y, tid, w):
        def loglik(shared, xi, yi, ti):
            logits, _ = classifier.apply(cl.replace(shared=shared), ctx, xi[None], ti[None], train=False)
            return -optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]
        g = jax.vmap(jax.grad(loglik), in_axes=(None, 0, 0, 0))(cl.shared, x, y, tid)
        return jax.tree.map(lambda a: jnp.tensordot(w, a**2, axes=1), g)

    def end_task(cl, data: TaskData):
        n = min(s["fisher_samples"], data.x.shape[0])
        idx = np.asarray(jax.random.permutation(data.key, data.x.shape[0]))[:n]
        fisher = cl.extra["fisher"]
        bs = data.batch_size
        for i in range(0, n, bs):
            chunk = np.resize(idx[i:i + bs], bs)  # fixed shape: one compilation
            w = (np.arange(bs) < n - i).astype(np.float32) / n
            g = fisher_chunk(cl, data.x[chunk], data.y[chunk], np.full(bs, data.t, np.int32), w)
            fisher = jax.tree.map(jnp.add, fisher, g)
        return cl.replace(extra={"fisher": fisher, "anchor": cl.shared})

    return base._replace(init=init, loss=loss, end_task=end_task)
