"""PAH's two-step distillation (De La Fuente et al. 2025): old tasks' generated heads kept close to
the teacher's, on the current batch and on each old task's own prototypes.

``begin_task`` snapshots the model as the teacher (the model after task ``t-1``,
:func:`clax.transforms.distill.snapshot`). Each batch then takes two optimiser steps inside the one
compiled step:

1. ``loss``: term ``kd``, :func:`old_task_kd` between the student's and the teacher's old heads'
   logits on the current batch (the model's ``outputs`` ``[B, T, C]``; the teacher's pass is outside
   training, so its BatchNorm statistics follow the model's ``bn``), added with weight ``alpha`` to
   the chain's cross-entropy; the trainer's optimizer steps all of ``cl.shared`` (backbone,
   hypernetwork, prototype table) on it;
2. ``post_update``: the prototype table only, on the same KD between the student's and the teacher's
   old-task logits on each old task's *own prototypes* (``own(cl) [C, T, C]``,
   :func:`clax.transforms.generated_head.own_outputs`), stepped by its own AdamW whose state is
   ``cl.extra[name]["opt"]`` (it carries over tasks). Only the rows ``j < t`` move.

``KD_j = T^2 * mean_batch KL(...)`` at temperature ``T``, summed over the old tasks ``j < t``.
``direction="student_teacher"`` (the authors' ``distillation_output_loss``: ``T^2 * sum_c p_s
log(p_s / p_t)`` with both probabilities clamped at :data:`KD_EPS`, mean over the batch) or
``"teacher_student"`` (``KL(teacher || student)``, Hinton's direction, no clamp). The table is
preallocated for all ``T`` tasks, so shapes are fixed and a new task adds no compilation; its cost
follows the tasks seen, not ``T`` (``block``): the prototype step runs (one ``lax.switch``) over the
shortest prefix of ``block``, ``2 block``, ``4 block``, ... tasks
(:func:`clax.transforms.generated_head.prefix_sizes`) that holds the old tasks, the gradient of the
rows after it 0, as with the mask ``j < t`` over the whole table (a task's KD depends on its own
prototypes only); step 1's old heads come from the model's pass over such a prefix
(:func:`clax.transforms.generated_head.every_outputs`). A step is bit for bit the whole table's on
the CPU (tested); see :mod:`clax.methods.pah` for a whole run.

Where clax differs from the authors' code: their prototype step also steps with the gradient left
over from step 1 (``opt_prototypes`` is not zeroed between the two backward passes); here step 2
uses the alignment loss's gradient only, as the paper describes. Their two AdamW optimisers keep
their state across tasks; clax's trainer re-initialises the main optimizer's state at each task (the
prototype step's state carries over).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from clax.compose import Transform, state, with_state
from clax.transforms.distill import kd_loss, snapshot, with_snapshot
from clax.transforms.generated_head import prefix_sizes

#: the authors' KL_divergence clamps both probabilities at this value (only with direction=student_teacher)
KD_EPS = 1e-10


def old_task_kd(student, teacher, t, mask, temperature: float = 2.0, direction: str = "teacher_student",
                eps: float = 0.0) -> jax.Array:
    """``sum_{j<t}`` of :func:`clax.transforms.distill.kd_loss` between task ``j``'s outputs (summed,
    not averaged, over the old tasks).

    Args:
      student, teacher: every task's outputs ``[N, T, C]``.
      t: the current task (traced int32): tasks ``j < t`` count, the others add 0 (fixed shapes).
      mask: bool ``[T, C]``: each task's valid outputs (the softmax of task ``j`` is over ``mask[j]``).
      temperature, direction, eps: as :func:`~clax.transforms.distill.kd_loss`.
    """
    per = jax.vmap(lambda sj, tj, m: kd_loss(sj, tj, temperature, m[None], direction, eps),
                   in_axes=(1, 1, 0))(student, teacher, mask)
    return jnp.sum(jnp.where(jnp.arange(student.shape[1]) < t, per, 0.0))


def two_step(ctx, own: Callable, alpha: float = 0.5, temperature: float = 2.0,
             direction: str = "student_teacher", lr: float = 1e-3, weight_decay: float = 0.01,
             table: str = "protos", name: str = "proto_distill", block: int | None = None) -> Transform:
    """The two-step distillation (module docstring) as a :class:`clax.compose.Transform` (TIL).

    Args:
      ctx: the stream's context (its task classes give each task's valid outputs).
      own: ``cl -> [N, T, C]``: task ``j``'s head on task ``j``'s own prototypes (from ``cl.shared[table]``).
      alpha: the weight of step 1's ``kd`` term.
      temperature, direction: of the KD (the clamp :data:`KD_EPS` goes with ``"student_teacher"``).
      lr, weight_decay: the prototype step's AdamW.
      table: the prototype table's name in ``cl.shared``.
      block: tasks per block of the prototype step (module docstring); ``None``: the whole table at once.

    State ``cl.extra[name] = {"teacher": snapshot, "opt": AdamW state of the table}``.
    """
    cmask = jnp.asarray(ctx.task_classes >= 0)
    eps = KD_EPS if direction == "student_teacher" else 0.0
    ptx = optax.adamw(lr, weight_decay=weight_decay)
    T = ctx.num_tasks
    sizes = prefix_sizes(T, T if block is None else block)

    def kd(student, teacher, t):
        return old_task_kd(student, teacher, t, cmask, temperature, direction, eps)

    def init(key, cl):
        return {"teacher": snapshot(cl), "opt": ptx.init(cl.shared[table])}

    def begin_task(cl, data):
        return with_state(cl, name, {**state(cl, name), "teacher": snapshot(cl)})

    def loss(cl, view, batch, key, t):
        teacher = with_snapshot(cl, state(cl, name)["teacher"])
        _, t_aux, _ = view.model.forward(teacher, view.data["x"], view.data["tid"], t, False, key)
        t_all = jax.lax.stop_gradient(view.model.outputs(teacher, t_aux))
        term = kd(view.model.outputs(cl, view.aux), t_all, t)
        return alpha * term, {"kd": term}

    def proto_grad(cl, teacher, t):
        """The prototype step's gradient for the whole table, over the shortest prefix that holds the
        old tasks (the rows after it: 0)."""
        frozen = jax.lax.stop_gradient(cl.shared)
        old = cl.shared[table]

        def prefix(n):
            def run(old, t_tab):
                t_own = jax.lax.stop_gradient(own(teacher.replace(shared={**teacher.shared, table: t_tab[:n]})))

                def proto_loss(protos):
                    student = own(cl.replace(shared={**frozen, table: protos}))
                    return old_task_kd(student, t_own, t, cmask[:n], temperature, direction, eps)

                g = jax.grad(proto_loss)(old[:n])
                return jnp.pad(g, ((0, T - n),) + ((0, 0),) * (g.ndim - 1))
            return run

        if len(sizes) == 1:
            return prefix(T)(old, teacher.shared[table])
        index = jnp.sum(jnp.asarray(sizes[:-1]) < t)  # the first prefix that holds tasks 0..t-1
        return jax.lax.switch(index, [prefix(n) for n in sizes], old, teacher.shared[table])

    def post_update(cl, batch, key, t):
        st = state(cl, name)
        old = cl.shared[table]
        grad = proto_grad(cl, with_snapshot(cl, st["teacher"]), t)
        upd, opt = ptx.update(grad, st["opt"], old)
        new = jnp.where((jnp.arange(old.shape[0]) < t).reshape((-1,) + (1,) * (old.ndim - 1)),
                        optax.apply_updates(old, upd), old)
        return with_state(cl.replace(shared={**cl.shared, table: new}), name, {**st, "opt": opt})

    return Transform(name, init=init, begin_task=begin_task, loss=loss, post_update=post_update,
                     scenarios=("til",))
