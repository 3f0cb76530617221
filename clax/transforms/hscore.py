"""H-score (Bao et al. 2019) and the H-embedding solve of Wu et al. (arXiv 2502.11609).

The H-score of features ``f [N, D]`` on labels ``y [N]`` measures how well the features separate the
classes: ``H = trace(pinv(cov(f)) @ cov(E[f | y]))``, where ``E[f | y]`` replaces every sample's
feature by the mean feature of its class. It is unchanged when ``f`` is multiplied by an invertible
matrix.

An H-embedding places a new task's embedding among the learned embeddings of earlier tasks so that
its distance to task ``j`` reflects how transferable task ``j``'s network is to the new task:
scores -> target distances (:func:`distances`) -> an embedding and a scale solving
``min_{e, s} sum_j | s d_j - ||e - e_j|| |`` (:func:`solve_embedding`, Adam lr 1e-3, 2000 steps,
``e`` initialised uniform(0, 1); ``s`` is learned only with at least two earlier tasks, else 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def hscore(f: jax.Array, y: jax.Array, num_classes: int, weights: jax.Array | None = None,
           rcond: float = 1e-6) -> jax.Array:
    """``trace(pinv(cov f) @ cov(E[f|y]))`` for features ``f [N, D]`` and integer labels ``y [N]`` in
    ``0..num_classes-1``; ``weights [N]`` (0/1) drops padded samples. Returns a scalar."""
    f = jnp.asarray(f, jnp.float32)
    w = jnp.ones(f.shape[0], f.dtype) if weights is None else jnp.asarray(weights, f.dtype)
    n = jnp.sum(w)
    mu = jnp.sum(w[:, None] * f, 0) / n
    fc = f - mu
    cov_f = (w[:, None] * fc).T @ fc / n
    onehot = jax.nn.one_hot(y, num_classes, dtype=f.dtype) * w[:, None]
    counts = onehot.sum(0)
    means = (onehot.T @ f) / jnp.maximum(counts, 1.0)[:, None]      # [K, D] class means
    g = jax.nn.one_hot(y, num_classes, dtype=f.dtype) @ means - mu   # E[f|y] per sample, centred
    cov_g = (w[:, None] * g).T @ g / n
    return jnp.trace(jnp.linalg.pinv(cov_f, rtol=rcond, hermitian=True) @ cov_g)


def distances(h: jax.Array, valid: jax.Array, form: str = "direct") -> jax.Array:
    """Target distances from H-scores ``h [J]`` of the earlier tasks (``valid [J]`` bool).

    ``direct``: ``d_j = (max H - H_j) + 0.1 + min H``; ``reciprocal``: ``d_j = 1 / (H_j - min H + 0.1)``
    (max and min over the valid entries). Invalid entries are 0.
    """
    hi = jnp.max(jnp.where(valid, h, -jnp.inf))
    lo = jnp.min(jnp.where(valid, h, jnp.inf))
    if form == "direct":
        d = (hi - h) + 0.1 + lo
    elif form == "reciprocal":
        d = 1.0 / (h - lo + 0.1)
    else:
        raise ValueError(f"hembed.distance_form must be 'direct' or 'reciprocal', got {form!r}")
    return jnp.where(valid, d, 0.0)


def solve_embedding(key: jax.Array, d: jax.Array, emb: jax.Array, valid: jax.Array, steps: int = 2000,
                    lr: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """``(e_hat [E], s)`` minimising ``sum_j valid_j | s d_j - ||e_hat - emb_j|| |``.

    ``d [J]`` target distances, ``emb [J, E]`` the earlier tasks' embeddings. ``e_hat`` starts
    uniform(0, 1), ``s`` at 1 and is learned only where at least two entries are valid. Adam, ``steps``
    steps of ``lr``, run as one ``lax.scan`` (fixed shapes: one compilation for every task).
    """
    learn_scale = jnp.sum(valid) >= 2
    params = {"e": jax.random.uniform(key, emb.shape[-1:]), "s": jnp.ones(())}
    tx = optax.adam(lr)

    def objective(p):
        s = jnp.where(learn_scale, p["s"], jax.lax.stop_gradient(p["s"]))
        dist = jnp.sqrt(jnp.sum((p["e"][None] - emb) ** 2, -1) + 1e-12)
        return jnp.sum(jnp.where(valid, jnp.abs(s * d - dist), 0.0))

    def step(carry, _):
        p, st = carry
        g = jax.grad(objective)(p)
        upd, st = tx.update(g, st, p)
        return (optax.apply_updates(p, upd), st), None

    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return p["e"], p["s"]


def cosine_embedding_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``1 - cos(pred, target)`` for two vectors ``[E]``."""
    num = jnp.sum(pred * target)
    den = jnp.sqrt(jnp.sum(pred**2) + 1e-12) * jnp.sqrt(jnp.sum(target**2) + 1e-12)  # finite grads at 0
    return 1.0 - num / den


def warmup_weight(t) -> jax.Array:
    """The embedding loss weight ``min(0.05 t, 1)`` from the third task (``t >= 2``, 0-based) on, else 0."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.where(t >= 2, jnp.minimum(0.05 * t, 1.0), 0.0)
