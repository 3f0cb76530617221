"""BatchNorm statistics re-estimated for a fixed network (after masking, pruning or a weight change).

Parameter-isolation methods train with one network and test with another: IBM trains with noisy,
unpruned weights ``W * z`` and tests with ``W * zscale * mask``; PackNet may prune after the last
epoch. Running statistics collected during training then describe the wrong network.
:func:`refresh` recomputes them for the network as it is tested: train-mode forward passes over the
task's training inputs in full batches (the training batch size, no augmentation), each BatchNorm
layer's batch mean and variance averaged over the batches with equal weight (the cumulative average of
PyTorch's ``torch.optim.swa_utils.update_bn``, i.e. ``momentum=None``).

It works with any :class:`~clax.models.Backbone`, whatever its BatchNorm momentum: a train-mode pass
returns ``momentum * old + (1 - momentum) * batch``, so two passes from statistics of all zeros and all
ones give both the momentum and the batch statistic.

:func:`refresh` is the transform of the masked networks (WSN, PackNet, IBM with ``bn="refresh"``): at the
end of task ``t`` it re-estimates the task's BatchNorm row for its test-time weights.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from clax.compose import Transform

PyTree = Any


def batch_statistics(apply: Callable, params: PyTree, stats: PyTree, x: jax.Array) -> PyTree:
    """The BatchNorm statistics of one batch ``x`` (the tree of ``stats``), from train-mode passes of
    ``apply(params, stats, x, train=True) -> (features, new_stats)``."""
    zeros = jax.tree.map(jnp.zeros_like, stats)
    ones = jax.tree.map(jnp.ones_like, stats)
    _, from_zeros = apply(params, zeros, x, True)   # (1 - m) * batch
    _, from_ones = apply(params, ones, x, True)     # m + (1 - m) * batch
    return jax.tree.map(lambda a, b: a / (1.0 - (b - a)), from_zeros, from_ones)


def full_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Positions ``0..n-1`` in order, in batches of ``min(batch_size, n)``; the last batch wraps around
    to the start, so every batch is full (no padding enters a batch statistic)."""
    b = max(1, min(int(batch_size), n))
    return [np.arange(s, s + b) % n for s in range(0, n, b)]


def make_refresh(apply: Callable) -> Callable:
    """``refresh(params, stats, x, batch_size, max_samples=0) -> stats``: the BatchNorm statistics of the
    network ``params`` re-estimated on inputs ``x``, for the backbone function
    ``apply(params, stats, x, train)``. The per-batch pass is compiled once, when first used.

    ``refresh``'s arguments: ``params``, the network as it is tested; ``stats``, its current statistics
    (only their structure is used; an empty tree is returned as is); ``x``, training inputs (an array or a
    lazy image source, read without augmentation); ``batch_size``, the batch size of the passes (use the
    training batch size); ``max_samples``, use only the first ``max_samples`` inputs (0: all). It returns
    ``stats``' tree holding the average of the per-batch statistics.
    """
    step = jax.jit(lambda p, s, xb: batch_statistics(apply, p, s, xb))

    def refresh(params: PyTree, stats: PyTree, x, batch_size: int, max_samples: int = 0) -> PyTree:
        if not jax.tree.leaves(stats):
            return stats
        if hasattr(x, "with_augment"):
            x = x.with_augment(False)
        n = x.shape[0] if not max_samples else min(int(max_samples), x.shape[0])
        total, batches = None, full_batches(n, batch_size)
        for idx in batches:
            b = step(params, stats, jnp.asarray(x[idx]))
            total = b if total is None else jax.tree.map(jnp.add, total, b)
        return jax.tree.map(lambda a: a / len(batches), total)

    return refresh


def refresh(ctx, weights: Callable, name: str = "bn_refresh") -> Transform:
    """The transform that, at the end of task ``t``, re-estimates BatchNorm row ``t`` of a masked network
    (:mod:`clax.transforms.consolidation`'s layout) for the network task ``t`` is tested with,
    ``weights(cl, t)`` (a :class:`~clax.transforms.consolidation.Mask`'s ``test``), on the task's training
    inputs in batches of the training batch size (:func:`clax.transforms.consolidation.refresh_task`).
    No other row changes; it keeps no state."""
    from clax.transforms import consolidation

    run = make_refresh(ctx.backbone.apply)

    def end_task(cl, data):
        return consolidation.refresh_task(cl, ctx, run, weights(cl, data.t), data.t, data.x, data.batch_size)

    return Transform(name, end_task=end_task, scenarios=("til",))
