"""Logit distillation (Hinton et al.): the KD loss used by LwF and PAH."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: the two directions of the KL divergence :func:`kd_loss` computes
DIRECTIONS = ("teacher_student", "student_teacher")


def kd_loss(student_logits, teacher_logits, temperature: float = 2.0, mask=None,
            direction: str = "teacher_student", eps: float = 0.0, t_squared: bool = True) -> jax.Array:
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
      t_squared: multiply by ``T^2`` (Hinton et al.'s scaling, which keeps the gradient's size as ``T``
        changes; PAH's authors' code has it); False: the plain KL, as Li & Hoiem's LwF loss.

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
    return (temperature**2 if t_squared else 1.0) * jnp.mean(jnp.sum(terms, axis=-1))


def snapshot(cl) -> dict:
    """A copy of the trained model (``shared``, ``per_task``, ``state``) to serve as a teacher."""
    return jax.tree.map(jnp.array, {"shared": cl.shared, "per_task": cl.per_task, "state": cl.state})


def with_snapshot(cl, snap: dict):
    """``cl`` with its model replaced by a snapshot (for the teacher's forward pass)."""
    return cl.replace(shared=snap["shared"], per_task=snap["per_task"], state=snap["state"])


def old_outputs(ctx, model_outputs, t):
    """``(outputs, mask)`` of the tasks before ``t``: TIL ``[B, T, C]`` with mask ``[1, T, C]`` (old
    tasks' valid outputs), CIL ``[B, K]`` with mask ``[1, K]`` (old tasks' classes)."""
    old = jnp.arange(ctx.num_tasks) < t
    if ctx.scenario == "til":
        return model_outputs, (old[:, None] & ctx.output_mask())[None]
    return model_outputs, jnp.any(ctx.output_mask() & old[:, None], axis=0)[None]


def lwf(ctx, alpha: float = 1.0, temperature: float = 2.0, name: str = "lwf"):
    """Learning without Forgetting (Li & Hoiem 2017) as a :class:`clax.compose.Transform`.

    ``begin_task`` snapshots the model as the teacher (``cl.extra[name]``); the term ``kd`` is
    ``KL(p_teacher || p_student)`` of the old tasks' outputs at temperature ``T`` (the model's
    ``outputs``: old heads in TIL, averaged over the ``t`` old tasks; old classes of the shared head in
    CIL) on every row the step trains on (the current task's, and a rehearsal transform's where the
    chain has one), added with weight ``alpha``. As Li & Hoiem's loss (``lambda_o * L_old`` with
    ``lambda_o = 1``, ``T = 2``) it has no ``T^2`` factor; the KL differs from their cross-entropy by
    the teacher's entropy, a constant, so the gradients are theirs. (clax before issue 13 multiplied
    by Hinton's ``T^2``: 4x the paper's weight at ``T = 2``.) In CIL, where no transform mixes old
    samples in, the current task's cross-entropy is restricted to its own classes (``ce_mask``, the
    CIL adaptation of FACIL and PyCIL), so that learning new classes does not push the old logits down.
    """
    from clax.compose import Transform, state, with_state

    def loss(cl, view, batch, key, t):
        aux, x = view.aux, view.data["x"]
        teacher = with_snapshot(cl, state(cl, name))
        _, t_aux, _ = view.model.forward(teacher, x, view.data["tid"], t, False, key)
        s_old, mask = old_outputs(ctx, view.model.outputs(cl, aux), t)
        t_old, _ = old_outputs(ctx, view.model.outputs(teacher, jax.tree.map(jax.lax.stop_gradient, t_aux)), t)
        kd = kd_loss(s_old, jax.lax.stop_gradient(t_old), temperature, mask, t_squared=False)
        if ctx.scenario == "til":  # mean over the old tasks, not over all T slots
            kd = kd * ctx.num_tasks / jnp.maximum(t, 1)
        return alpha * kd, {"kd": kd}

    def ce_mask(tid, t):
        return ctx.output_mask()[tid]

    return Transform(name, init=lambda key, cl: snapshot(cl), loss=loss,
                     begin_task=lambda cl, data: with_state(cl, name, snapshot(cl)),
                     ce_mask=ce_mask if ctx.scenario == "cil" else None)
