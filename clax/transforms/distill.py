"""Logit distillation (Hinton et al.): the KD loss used by LwF and PAH."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def kd_loss(student_logits, teacher_logits, temperature: float = 2.0, mask=None) -> jax.Array:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per sample, averaged over the batch.

    ``mask`` (broadcastable to the logits, bool) restricts the softmax to selected outputs.
    """
    s, t = student_logits / temperature, teacher_logits / temperature
    if mask is not None:
        s, t = jnp.where(mask, s, -1e9), jnp.where(mask, t, -1e9)
    p_t = jax.nn.softmax(t, axis=-1)
    kl = jnp.sum(p_t * (jax.nn.log_softmax(t, axis=-1) - jax.nn.log_softmax(s, axis=-1)), axis=-1)
    return temperature**2 * jnp.mean(kl)
