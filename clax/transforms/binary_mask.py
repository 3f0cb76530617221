"""Binary masks from scores: keep the top ``c`` fraction of ``|scores|``, straight-through gradient (WSN).

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


def kept_count(n: int, c: float) -> int:
    """How many of ``n`` scores a kept fraction ``c`` keeps, by the authors' WSN rule: their
    ``percentile`` takes the ``k``-th smallest score with
    ``k = 1 + round(0.01 (100 (1 - c)) (n - 1))`` (Python's round, their float expression) and keeps
    the scores at or above it, i.e. ``n - k + 1`` of them (more where scores tie at the threshold). ``round(c * n)`` can differ from this by one."""
    k = 1 + round(0.01 * float((1.0 - float(c)) * 100) * (int(n) - 1))  # their float expression, exactly
    return int(n) - k + 1


def top_fraction(scores: jax.Array, c: float) -> jax.Array:
    """Float mask with 1 where ``|scores|`` is among the top ``c`` fraction of its tensor.

    As the authors' WSN (``GetSubnetFaster`` over ``percentile``): the threshold is the
    :func:`kept_count`-th largest ``|score|``, and every score at or above it is kept, ties included.
    """
    flat = jnp.abs(scores).ravel()
    k = max(1, kept_count(flat.size, c))
    # the k-th largest |score|, as the minimum of the top k gathered by index: the same value as
    # top_k's last value, but XLA on CPU runs this form in about half the time (6.8 against 13.6 ms on
    # a 256 x 256 layer)
    threshold = jnp.min(flat[jax.lax.top_k(flat, k)[1]])
    return (jnp.abs(scores) >= threshold).astype(scores.dtype)


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
    """``hard`` in the forward pass, identity gradient to ``soft`` in the backward pass."""
    return soft + jax.lax.stop_gradient(hard - soft)


def top_fraction_ste(scores: jax.Array, c: float) -> jax.Array:
    """:func:`top_fraction` with the straight-through gradient of the authors' WSN: the mask is a
    function of ``|scores|`` whose backward pass is the identity, so the gradient that reaches a score is
    ``g * sign(score)`` (``GetSubnetFaster.backward`` returns ``g`` to ``w_m.abs()``, and autograd
    multiplies by the sign). A negative score whose weight helps thus grows in magnitude, into the mask."""
    a = jnp.abs(scores)
    return straight_through(top_fraction(scores, c), a)


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
