"""Binary masks from scores: keep the top ``c`` fraction, straight-through gradient (WSN, SupSup).

Shared by WSN, IBM-style consolidation and the binary Soft-TF variant. Stored masks are bit-packed
(one bit per weight).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_fraction(name: str, c: float) -> float:
    """Validates a kept fraction or sparsity in the open interval (0, 1)."""
    if not 0.0 < float(c) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {c}")
    return float(c)


def top_fraction(scores: jax.Array, c: float) -> jax.Array:
    """Float mask with 1 where ``|scores|`` is among the top ``c`` fraction of its tensor.

    Ties at the threshold are broken by position so that exactly ``round(c * n)`` entries are kept.
    """
    flat = jnp.abs(scores).ravel()
    k = max(1, int(round(c * flat.size)))
    idx = jax.lax.top_k(flat, k)[1]
    return jnp.zeros_like(flat).at[idx].set(1.0).reshape(scores.shape)


def straight_through(hard: jax.Array, scores: jax.Array) -> jax.Array:
    """``hard`` in the forward pass, identity gradient to ``scores`` in the backward pass."""
    return scores + jax.lax.stop_gradient(hard - scores)


def top_fraction_ste(scores: jax.Array, c: float) -> jax.Array:
    """:func:`top_fraction` with a straight-through gradient to ``scores``."""
    return straight_through(top_fraction(scores, c), scores)


def pack(mask) -> np.ndarray:
    """A boolean mask as bytes, one bit per entry (``np.packbits`` of the flattened mask)."""
    return np.packbits(np.asarray(mask, bool).ravel())


def unpack(packed: np.ndarray, shape) -> np.ndarray:
    """Inverse of :func:`pack` for a mask of ``shape``."""
    n = int(np.prod(shape))
    return np.unpackbits(np.asarray(packed, np.uint8), count=n).astype(bool).reshape(shape)


def packed_nbytes(shape) -> int:
    """Bytes that a bit-packed mask of ``shape`` occupies."""
    return -(-int(np.prod(shape)) // 8)
