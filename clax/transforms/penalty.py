"""Quadratic penalties that anchor the shared parameters: EWC's Fisher-weighted one and SI's path
integral (Zenke et al. 2017), each a :class:`clax.compose.Transform` over ``cl.shared``.

Both add ``strength * sum_i Omega_i (theta_i - theta*_i)^2`` with their own importance ``Omega`` and
anchor ``theta*`` (the shared parameters at the end of the last task) in ``cl.extra[name]``; they work
on any model, since they read nothing but ``cl.shared`` and the model's ``forward``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.compose import Transform, state, with_state
from clax.methods.base import TaskData


def quadratic(importance, params, anchor) -> jax.Array:
    """``sum_i importance_i (params_i - anchor_i)^2`` over every leaf."""
    terms = jax.tree.map(lambda w, p, a: jnp.sum(w * (p - a) ** 2), importance, params, anchor)
    return sum(jax.tree.leaves(terms))


def ewc(lam: float = 1e5, fisher_samples: int = 256, name: str = "ewc") -> Transform:
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017): after each task the diagonal
    empirical Fisher information of ``cl.shared`` (per-sample gradients of the log-likelihood of the
    sample's target, model in test mode, ``fisher_samples`` samples of the task) is added to the
    running sum, and the anchor moves to the task's final parameters; term ``ewc`` is
    ``lam / 2 * sum F (theta - theta*)^2``."""
    def init(key, cl):
        return {"fisher": jax.tree.map(jnp.zeros_like, cl.shared), "anchor": cl.shared}

    def loss(cl, view, batch, key, t):
        st = state(cl, name)
        reg = 0.5 * lam * quadratic(st["fisher"], cl.shared, st["anchor"])
        return reg, {"ewc": reg}

    @functools.partial(jax.jit, static_argnums=0)
    def fisher_chunk(model, cl, x, y, tid, w, t):
        def loglik(shared, xi, yi, ti):
            logits, _, _ = model.forward(cl.replace(shared=shared), xi[None], ti[None], t, False,
                                         jax.random.PRNGKey(0))
            yi = yi[None] if model.targets is None else model.targets(yi[None], ti[None], t)
            return -optax.softmax_cross_entropy_with_integer_labels(logits, yi)[0]
        g = jax.vmap(jax.grad(loglik), in_axes=(None, 0, 0, 0))(cl.shared, x, y, tid)
        return jax.tree.map(lambda a: jnp.tensordot(w, a**2, axes=1), g)

    def end_task(cl, data: TaskData):
        n = min(fisher_samples, data.x.shape[0])
        idx = np.asarray(jax.random.permutation(data.key, data.x.shape[0]))[:n]
        fisher = state(cl, name)["fisher"]
        bs = data.batch_size
        for i in range(0, n, bs):
            chunk = np.resize(idx[i:i + bs], bs)  # fixed shape: one compilation
            w = (np.arange(bs) < n - i).astype(np.float32) / n
            g = fisher_chunk(data.model, cl, data.x[chunk], data.y[chunk], np.full(bs, data.t, np.int32), w, jnp.int32(data.t))
            fisher = jax.tree.map(jnp.add, fisher, g)
        return with_state(cl, name, {"fisher": fisher, "anchor": cl.shared})

    return Transform(name, init=init, loss=loss, end_task=end_task)


def si(c: float = 0.1, xi: float = 1e-3, name: str = "si") -> Transform:
    """Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

    During a task, ``on_update`` accumulates each shared parameter's contribution to the change in
    loss along its trajectory, ``omega += -g * delta`` with the step's gradient ``g`` and parameter
    change ``delta`` (the optimizer's update), inside the compiled step: no second backward pass. The
    gradient is the one the optimizer receives, i.e. of the total loss, SI's penalty included (a
    gradient of the task loss alone would need a second backward pass). At the end of the task
    ``Omega += omega / ((theta_end - theta_start)^2 + xi)``, ``omega`` is reset and the anchor moves to
    ``theta_end``; term ``si`` is ``c * sum Omega (theta - theta*)^2``. Defaults: the paper's split-
    and permuted-MNIST damping ``xi = 1e-3`` and ``c = 0.1``.
    """

    def init(key, cl):
        zeros = jax.tree.map(jnp.zeros_like, cl.shared)
        return {"omega": zeros, "importance": zeros, "anchor": cl.shared}

    def loss(cl, view, batch, key, t):
        st = state(cl, name)
        reg = c * quadratic(st["importance"], cl.shared, st["anchor"])
        return reg, {"si": reg}

    def on_update(cl, grads, updates, t):
        st = state(cl, name)
        omega = jax.tree.map(lambda w, g, u: w - g * u, st["omega"], grads["shared"], updates["shared"])
        return with_state(cl, name, {**st, "omega": omega})

    def end_task(cl, data: TaskData):
        st = state(cl, name)
        imp = jax.tree.map(lambda o, i, p, a: i + o / ((p - a) ** 2 + xi),
                           st["omega"], st["importance"], cl.shared, st["anchor"])
        return with_state(cl, name, {"omega": jax.tree.map(jnp.zeros_like, st["omega"]), "importance": imp,
                                     "anchor": cl.shared})

    return Transform(name, init=init, loss=loss, on_update=on_update, end_task=end_task)
