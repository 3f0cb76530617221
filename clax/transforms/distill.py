"""Logit distillation (Hinton et al.): the KD loss used by LwF and PAH."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: the two directions of the KL divergence :func:`kd_loss` computes
DIRECTIONS = ("teacher_student", "student_teacher")


def kd_loss(student_logits, teacher_logits, temperature: float = 2.0, mask=None,
            direction: str = "teacher_student", eps: float = 0.0) -> jax.Array:
    """``T^2 * KL`` between the tempered softmaxes, summed over classes, averaged over every other axis.

    Args:
      student_logits, teacher_logits: logits ``[..., C]`` (the last axis is the classes).
      temperature: ``T``; both softmaxes are taken of ``logits / T`` and the KL is multiplied by ``T^2``.
      mask: bool, broadcastable to the logits: restricts the softmax to selected outputs (the others
        contribute nothing).
      direction: ``"teacher_student"`` (default): ``KL(p_teacher || p_student)``, Hinton et al.'s
        distillation and LwF's (clax's LwF uses it). ``"student_teacher"``: ``KL(p_student || p_teacher)
        = sum_c p_s (log p_s - log p_t)``, what PAH's authors' code computes
        (``distillation_output_loss`` in pah2025/PAH ``utils.py``: ``KL_divergence(student_soft,
        teacher_soft)`` times ``T^2``, then ``.mean()`` over the batch).
      eps: when positive, each probability is clamped to at least ``eps`` before the KL (the PAH
        authors' ``KL_divergence`` clamps both at 1e-10); computed as ``exp(max(log p, log eps))``,
        the same value without forming ``log`` of an underflowed probability. 0: no clamp.

    Returns:
      A scalar: the per-sample KL (sum over the last axis) times ``T^2``, averaged over all leading
      axes (``batchmean`` for ``[B, C]`` logits).

    Raises:
      ValueError: an unknown ``direction`` or a negative ``eps``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"kd_loss direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    if not eps >= 0:
        raise ValueError(f"kd_loss eps must be >= 0, got {eps!r}")
    s, t = student_logits / temperature, teacher_logits / temperature
    if mask is not None:
        s, t = jnp.where(mask, s, -1e9), jnp.where(mask, t, -1e9)
    log_s, log_t = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
    if eps > 0:
        floor = math.log(eps)
        log_s, log_t = jnp.maximum(log_s, floor), jnp.maximum(log_t, floor)
        p_s, p_t = jnp.exp(log_s), jnp.exp(log_t)
    else:
        p_s, p_t = jax.nn.softmax(s, axis=-1), jax.nn.softmax(t, axis=-1)
    if direction == "teacher_student":
        terms = p_t * (log_t - log_s)
    else:
        terms = p_s * (log_s - log_t)
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    return temperature**2 * jnp.mean(jnp.sum(terms, axis=-1))
