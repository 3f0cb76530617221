"""Pieces the frozen-backbone methods (CLR, Soft-TF) share: per-sample task dispatch of a per-task
network, the frozen backbone's own features, the record of trained tasks (a transform,
``cl.extra["trained"]``) and the pretrained backbone's report (a transform).

A frozen-backbone model computes one task's outputs at a time (``run(cl, x, s, train)`` under task
``s``'s rows). :func:`by_task` evaluates it per sample; :func:`train_rows` is the training forward: every
row of the current task ``t`` exactly as ``run(cl, x, t, True)`` gives it, and rows of other tasks
(mixed in by rehearsal joined with ``+``) under their own task's stored rows, in evaluation mode and
without gradient (those rows are frozen during task ``t``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clax.compose import Transform, with_state


def by_task(fn: Callable[[jax.Array], jax.Array], tid, num_tasks: int) -> jax.Array:
    """``fn(t) -> [B, ...]`` evaluated with sample ``b`` under task ``tid[b]``.

    ``tid`` is a scalar (one call) or ``[B]``: where every sample has the same id (the usual case) one
    call runs; otherwise ``fn`` runs for every task and each sample takes its own task's row.
    """
    if jnp.ndim(tid) == 0:
        return fn(tid)

    def mixed():
        outs = jax.lax.map(fn, jnp.arange(num_tasks))  # [T, B, ...]
        return outs[tid, jnp.arange(tid.shape[0])]

    return jax.lax.cond(jnp.all(tid == tid[0]), lambda: fn(tid[0]), mixed)


def train_rows(run: Callable, cl, x, tid, t, num_tasks: int):
    """The training forward of a per-task model: ``(logits [B, K], new cl.state)``.

    ``run(cl, x, s, train) -> (logits, new state)`` computes every row under task ``s``. Rows of task
    ``t`` (the one being trained) take ``run(cl, x, t, True)``, whose new state is returned; where the
    batch holds rows of other tasks (rehearsal), those take ``run(cl, x, tid_b, False)`` of their own
    task with no gradient (their rows are not trained in task ``t``). A batch of task ``t`` alone gets
    ``run(cl, x, t, True)`` unchanged (the other branch of a ``lax.cond``). A scalar ``tid`` says every row
    is task ``t``'s (known when the step is traced, :attr:`clax.compose.Model.scalar_tid`): then only
    ``run(cl, x, t, True)`` is traced, not the dispatch's two further passes.
    """
    logits, state = run(cl, x, t, True)
    if jnp.ndim(tid) == 0:
        return logits, state
    frozen = jax.lax.stop_gradient(cl)

    def mixed(own):
        other = by_task(lambda s: run(frozen, x, s, False)[0], tid, num_tasks)
        return jnp.where((tid == t)[:, None], own, other)

    return jax.lax.cond(jnp.all(tid == t), lambda own: own, mixed, logits), state


def features(ctx) -> Callable:
    """``(cl, x) -> [B, D]``: the frozen backbone's own features (``frozen["backbone"]`` with
    ``state["backbone"]``, in evaluation mode; no per-task rows): the query of NCM and of prompt keys."""
    return lambda cl, x: ctx.backbone.apply(cl.frozen["backbone"], cl.state["backbone"], x, False)[0]


def check_trained(cl, tid, name: str = "trained") -> None:
    """Raises ValueError naming a task id in ``tid`` that has not been trained (host-side values only;
    under ``jit`` it does nothing, see :func:`clax.methods.frozen.checked_predict`)."""
    done = cl.extra.get(name)
    if tid is None or done is None or isinstance(tid, jax.core.Tracer) or isinstance(done, jax.core.Tracer):
        return
    done = np.asarray(done)
    for i in np.unique(np.asarray(tid)).tolist():
        if not 0 <= i < len(done) or not done[i]:
            names = ", ".join(map(str, np.flatnonzero(done).tolist())) or "none yet"
            raise ValueError(f"task id {i} has not been trained (trained task ids: {names})")


def mark_trained(cl, t: int, name: str = "trained"):
    """``cl`` with task ``t`` recorded as trained in ``extra[name]`` (``[T]`` bool)."""
    return with_state(cl, name, cl.extra[name].at[t].set(True))


def trained(num_tasks: int, name: str = "trained") -> Transform:
    """The record of trained tasks: ``cl.extra[name]``, ``[T]`` bool, set at the end of each task.

    Its prediction wrapper refuses, host-side, a task id that has not been trained (naming it); under
    ``jit`` it checks nothing. Task inference (:mod:`clax.transforms.task_inference`) reads the record
    to choose among trained tasks only.
    """
    def predict(inner):
        def checked(cl, x, tid):
            check_trained(cl, tid, name)
            return inner(cl, x, tid)
        return checked

    return Transform(name, init=lambda key, cl: jnp.zeros((num_tasks,), bool), predict=predict,
                     end_task=lambda cl, data: mark_trained(cl, data.t, name))


def pretrained(report: dict, name: str = "pretrained") -> Transform:
    """The frozen backbone's source in results.json: ``{"pretrain": report}`` (see
    :func:`clax.pretrain.pretrained_backbone`); no state, no hook beyond the report."""
    return Transform(name, report=lambda cl: {"pretrain": report})
