"""Information-bottleneck variational masks (IBM, Chen et al. 2023, arXiv 2312.00840).

Every masked weight ``W`` gets variational parameters of its shape, ``mu`` (init ``N(1, 0.01)``) and
``logD`` (init ``N(-10, 0.01)``). In training the network uses ``W * z`` with
``z = mu + eps * exp(logD / 2)``, one ``eps ~ N(0, 1)`` per weight and batch. The per-layer KL term is
``0.5 * ratio_l * sum(log(1 + mu^2 / exp(logD)))``, where ``ratio_l`` (:func:`svd_ratio`) is the share
of the layer's output channels needed for 97% of its centred features' variance. A weight is kept
where ``log alpha = logD - log(mu^2) < 0``; at test time task ``t`` uses ``W * zscale_t * mask_t``.

All functions work leaf by leaf on trees of the weights' structure.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
EPS = 1e-8  # as in the authors' code, inside log(1 + mu^2 / (D + eps)) and log(mu^2 + eps)


def init(key, weights: PyTree, mu: float = 1.0, log_d: float = -10.0, std: float = 0.01) -> dict:
    """``{"mu": tree, "logD": tree}`` of ``weights``' shapes drawn from ``N(mu, std)`` and ``N(log_d, std)``."""
    leaves, treedef = jax.tree.flatten(weights)
    keys = jax.random.split(key, 2 * len(leaves))
    mus = [mu + std * jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys[::2], leaves)]
    lds = [log_d + std * jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys[1::2], leaves)]
    return {"mu": jax.tree.unflatten(treedef, mus), "logD": jax.tree.unflatten(treedef, lds)}


def sample_z(key, mu: PyTree, log_d: PyTree) -> PyTree:
    """The noisy multiplier ``z = mu + eps * exp(logD / 2)``, ``eps ~ N(0, 1)`` per entry."""
    leaves, treedef = jax.tree.flatten(mu)
    keys = jax.random.split(key, len(leaves))
    eps = jax.tree.unflatten(treedef, [jax.random.normal(k, m.shape, m.dtype) for k, m in zip(keys, leaves)])
    return jax.tree.map(lambda m, d, e: m + e * jnp.exp(d / 2), mu, log_d, eps)


def kl(mu: jax.Array, log_d: jax.Array) -> jax.Array:
    """One layer's KL term before its ratio: ``0.5 * sum(log(1 + mu^2 / (exp(logD) + 1e-8)))`` (scalar)."""
    return 0.5 * jnp.sum(jnp.log1p(mu**2 / (jnp.exp(log_d) + EPS)))


def total_kl(mu: PyTree, log_d: PyTree, ratio: PyTree) -> jax.Array:
    """``sum_l ratio_l * kl(mu_l, logD_l)``; ``ratio`` holds one scalar per layer."""
    return sum(jax.tree.leaves(jax.tree.map(lambda m, d, r: r * kl(m, d), mu, log_d, ratio)))


def log_alpha(mu: PyTree, log_d: PyTree) -> PyTree:
    """``logD - log(mu^2 + 1e-8)`` per entry."""
    return jax.tree.map(lambda m, d: d - jnp.log(m**2 + EPS), mu, log_d)


def mask(mu: PyTree, log_d: PyTree, threshold: float = 0.0) -> PyTree:
    """The bool mask ``log alpha < threshold`` (the kept weights)."""
    return jax.tree.map(lambda a: a < threshold, log_alpha(mu, log_d))


def zscale(mu: PyTree, log_d: PyTree) -> PyTree:
    """The test-time multiplier ``mu + exp(logD / 2)`` (the authors' ``reparameterize(sampling=False)``)."""
    return jax.tree.map(lambda m, d: m + jnp.exp(d / 2), mu, log_d)


def svd_ratio(features, var: float = 0.97) -> float:
    """Share of channels needed for ``var`` of the variance of ``features`` (``[N, C]`` or ``[N, ..., C]``,
    channels last), centred per channel: ``k / C`` where ``k`` is the smallest number of principal
    components whose explained variance reaches ``var``.

    Computed from the eigenvalues of the ``C x C`` scatter matrix (the squared singular values of the
    centred ``[N, C]`` matrix), which is cheaper than an SVD when ``N >> C``. The authors' code counts
    the components strictly below ``var`` (one fewer); SPEC.md's "reaching 97%" is followed here.
    """
    f = np.asarray(features, np.float64)
    f = f.reshape(-1, f.shape[-1])
    f = f - f.mean(0)
    ev = np.clip(np.linalg.eigvalsh(f.T @ f)[::-1], 0, None)
    total = ev.sum()
    if total <= 0:
        return 1.0
    k = int(np.searchsorted(np.cumsum(ev) / total, var - 1e-12) + 1)
    return min(k, f.shape[1]) / f.shape[1]
