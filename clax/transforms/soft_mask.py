"""Per-task real-valued multiplicative masks on selected weights (Soft-TF, Kang & Yoo 2024).

A filter (a regular expression searched in ``/``-joined parameter paths, as in
:func:`clax.partition.split`) selects weights ``W``; task ``t`` owns a mask ``M_t`` of ``W``'s full shape
and the backbone runs with ``W_t = M_t * W``. Masks start uniform in ``[0.99, 1.0]`` so that a fresh
task starts from the pretrained solution. Masks are stored under ``"."``-joined paths (checkpoint-safe
keys) with a leading task axis ``[T, *W.shape]``.

Stored precision: :func:`quantize` rounds a mask to the precision it is stored in (``float32``,
``float16``, ``bfloat16`` or ``int8`` with a per-tensor affine range) and back, so that a model can be
evaluated exactly as it is stored; :func:`stored_nbytes` gives the bytes.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

PyTree = Any
PRECISIONS = ("float32", "float16", "bfloat16", "int8")


def select(params: PyTree, filter: str) -> dict[str, tuple]:
    """The leaves of ``params`` whose ``/``-joined path matches the regex ``filter``: ``{key: path}``.

    Raises:
      ValueError: the filter matches no parameter, or is not a valid regular expression (the message
        names the filter).
    """
    try:
        pattern = re.compile(filter)
    except re.error as e:
        raise ValueError(f"mask filter {filter!r} is not a valid regular expression: {e}") from None
    flat = flatten_dict(params)
    hits = {".".join(map(str, k)): k for k in flat if pattern.search("/".join(map(str, k)))}
    if not hits:
        some = ", ".join("/".join(map(str, k)) for k in list(flat)[:6])
        raise ValueError(f"mask filter {filter!r} matches no parameter (paths look like: {some}, ...)")
    return hits


def init(key: jax.Array, params: PyTree, filter: str, num_tasks: int, low: float = 0.99,
         high: float = 1.0) -> dict[str, jax.Array]:
    """Masks ``{key: [T, *W.shape]}``, uniform in ``[low, high]``, for the weights ``filter`` selects."""
    flat = flatten_dict(params)
    sel = select(params, filter)
    keys = jax.random.split(key, len(sel))
    return {k: jax.random.uniform(kk, (num_tasks,) + flat[p].shape, jnp.float32, low, high)
            for kk, (k, p) in zip(keys, sorted(sel.items()))}


def apply(params: PyTree, masks: dict[str, jax.Array]) -> PyTree:
    """``params`` with each masked weight multiplied by its mask (one task's row, ``W.shape``)."""
    flat = dict(flatten_dict(params))
    for k, m in masks.items():
        p = tuple(k.split("."))
        flat[p] = flat[p] * m.astype(flat[p].dtype)
    return unflatten_dict(flat)


def row(masks: dict[str, jax.Array], t) -> dict[str, jax.Array]:
    """Task ``t``'s masks (``t`` a Python or traced int)."""
    return {k: m[t] for k, m in masks.items()}


def superimpose(masks: dict[str, jax.Array], alpha: jax.Array) -> dict[str, jax.Array]:
    """``sum_t alpha[t] * M_t`` for every mask: the superposition used by one-shot task inference."""
    return {k: jnp.tensordot(alpha, m, axes=1) for k, m in masks.items()}


def quantize(mask: jax.Array, precision: str) -> jax.Array:
    """``mask`` rounded to ``precision`` and back to float32 (what a stored mask evaluates as).

    ``int8`` is 256 levels evenly spaced over the tensor's ``[min, max]`` (two float32 stored beside).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown mask precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "float32":
        return mask.astype(jnp.float32)
    if precision == "int8":
        lo, hi = jnp.min(mask), jnp.max(mask)
        step = jnp.where(hi > lo, (hi - lo) / 255.0, 1.0)
        return lo + jnp.round((mask - lo) / step) * step
    return mask.astype(jnp.dtype(precision)).astype(jnp.float32)


def stored_nbytes(shape, precision: str) -> int:
    """Bytes a mask of ``shape`` occupies stored at ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown mask precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    n = int(np.prod(shape))
    return n + 8 if precision == "int8" else n * jnp.dtype(precision).itemsize
