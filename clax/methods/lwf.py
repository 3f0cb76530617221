"""Learning without Forgetting (Li & Hoiem, TPAMI 2017).

At the start of each task the model is snapshotted as the teacher; while the task trains, the
student's outputs for old tasks on the new data are distilled towards the teacher's
(``alpha * T^2 * KL`` at temperature ``T``). In TIL the old outputs are the old tasks' heads; in CIL
they are the old tasks' classes of the shared head, and the cross-entropy is taken over the current
task's classes only, so that learning new classes does not push the old logits down (the CIL
adaptation of LwF in FACIL and PyCIL; with a softmax over all classes LwF forgets as much as
fine-tuning on split-digits).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clax.methods.base import Context, Method, TaskData
from clax.methods.finetune import classifier_method
from clax.settings import NON_NEGATIVE, POSITIVE, check_settings
from clax.transforms import classifier
from clax.transforms.distill import kd_loss

LWF_DEFAULTS = {"alpha": 1.0, "temperature": 2.0}
LWF_RULES = {"alpha": NON_NEGATIVE, "temperature": POSITIVE}


def snapshot(cl) -> dict:
    """A copy of the trainable model (shared, per-task, state) to serve as a teacher."""
    return jax.tree.map(jnp.array, {"shared": cl.shared, "per_task": cl.per_task, "state": cl.state})


def with_snapshot(cl, snap: dict):
    """``cl`` with its model replaced by a snapshot (for the teacher's forward pass)."""
    return cl.replace(shared=snap["shared"], per_task=snap["per_task"], state=snap["state"])


def old_task_logits(cl, ctx: Context, f, t):
    """Outputs of tasks before ``t`` for features ``f``: ``([B, T, C], mask [1, T, C])`` in TIL,
    ``([B, C], mask [1, C])`` in CIL."""
    old = jnp.arange(ctx.num_tasks) < t
    if ctx.scenario == "til":
        head = cl.per_task["head"]
        logits = jnp.einsum("bd,tdc->btc", f, head["kernel"]) + head["bias"][None]
        return logits, (old[:, None] & ctx.output_mask())[None]
    logits = classifier.head_logits(cl.shared["head"], f)
    return logits, jnp.any(ctx.output_mask() & old[:, None], axis=0)[None]


def lwf(ctx: Context, **settings) -> Method:
    """LwF with settings ``alpha`` (distillation weight) and ``temperature``."""
    s = check_settings("lwf", LWF_DEFAULTS, settings, LWF_RULES)
    base = classifier_method("lwf", ctx)

    def init(key):
        cl = base.init(key)
        return cl.replace(extra={"teacher": snapshot(cl)})

    def loss(cl, batch, key, t):
        f, state = classifier.features(cl, ctx, batch["x"], train=True)
        logits = classifier.logits_from_features(cl, ctx, f, batch["tid"])
        if ctx.scenario == "cil":  # cross-entropy over the current task's classes only (see above)
            logits = jnp.where(ctx.output_mask()[batch["tid"]], logits, classifier.NEG)
        ce = classifier.cross_entropy(logits, batch["y"])
        teacher = with_snapshot(cl, cl.extra["teacher"])
        ft, _ = classifier.features(teacher, ctx, batch["x"], train=False)
        s_old, mask = old_task_logits(cl, ctx, f, t)
        t_old, _ = old_task_logits(teacher, ctx, jax.lax.stop_gradient(ft), t)
        kd = kd_loss(s_old, jax.lax.stop_gradient(t_old), s["temperature"], mask)
        if ctx.scenario == "til":  # mean over the old tasks, not over all T slots
            kd = kd * ctx.num_tasks / jnp.maximum(t, 1)
        total = ce + s["alpha"] * kd
        return total, (state, {"loss": total, "ce": ce, "kd": kd})

    def begin_task(cl, data: TaskData):
        return cl.replace(extra={"teacher": snapshot(cl)})

    return base._replace(init=init, loss=loss, begin_task=begin_task)
