"""Task-id inference at test time (CIL) for a model with per-task rows (Soft-TF): a prediction wrapper.

Where a sample comes without a task id (CIL), :func:`task_inference` infers one per sample by the chosen
rule and predicts with that task's rows. Rules are functions ``(cl, x) -> [B]`` int task ids, choosing
among the trained tasks (``cl.extra["trained"]``, :func:`clax.transforms.frozen.trained`):

* ``"ncm"`` (built in, its state is this transform's): nearest class mean of the frozen backbone's
  L2-normalised features, means taken over each task's training data at its end;
* :func:`entropy`: the one-shot rule of SupSup (Wortsman et al. 2020): superimpose the trained tasks'
  rows with weights ``alpha = 1/T_seen`` and pick the task with the largest ``-d(entropy)/d(alpha_t)``
  (one forward-mode derivative per task);
* any other, e.g. DualPrompt's key matching (:func:`clax.transforms.prompt.rule`).

results.json reports (``task_inference``) the task-id accuracy and the class accuracy of every rule.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clax.compose import NEG, Transform, state, with_state


def class_tasks(ctx) -> np.ndarray:
    """``[K]`` int32: the task of each class (-1 for a class of no task)."""
    out = np.full(ctx.num_outputs, -1, np.int32)
    for t, cs in enumerate(ctx.task_classes):
        out[cs[cs >= 0]] = t
    return out


def entropy(superposed: Callable, out_mask, trained: str = "trained") -> Callable:
    """SupSup's one-shot rule ``(cl, x) -> [B]`` from ``superposed(cl, x, alpha [T]) -> logits [B, K]``
    (the model with every task's rows superimposed with weights ``alpha``); ``out_mask [T, K]`` the
    outputs of each task (the trained tasks' outputs form the softmax)."""
    def infer(cl, x):
        done = cl.extra[trained]
        alpha0 = done.astype(jnp.float32) / jnp.maximum(jnp.sum(done), 1)
        valid = jnp.any(out_mask & done[:, None], axis=0)

        def ent(alpha):
            logp = jax.nn.log_softmax(jnp.where(valid, superposed(cl, x, alpha), NEG))
            return -jnp.sum(jnp.exp(logp) * logp, axis=-1)                         # [B]

        grad = jax.jacfwd(ent)(alpha0)                                             # [B, T]
        return jnp.argmax(jnp.where(done[None], -grad, -jnp.inf), axis=-1).astype(jnp.int32)
    return infer


def task_inference(ctx, query: Callable, predict: Callable, rule: str = "ncm", rules: dict | None = None,
                   name: str = "task_inference", trained: str = "trained") -> Transform:
    """Task-id inference in CIL as a :class:`clax.compose.Transform` (owns ``task_inference``).

    Args:
      ctx: the stream's :class:`clax.methods.base.Context`.
      query: ``(cl, x) -> [B, D]`` the features NCM compares (the frozen backbone's own).
      predict: the model's ``(cl, x, tid) -> logits`` (for the report's class accuracy).
      rule: the rule prediction uses: ``"ncm"`` or a key of ``rules``.
      rules: further rules ``{name: (cl, x) -> [B]}`` (e.g. ``{"entropy": entropy(...)}``).

    State ``cl.extra[name] = {"class_means": [K, D]}`` (NCM's, set at the end of each task). The
    prediction wrapper infers ``tid`` where it is None; ``test_report`` gives ``task_inference``:
    the rule, and per rule the task-id and class accuracy on every task's test set.
    """
    class_task = jnp.asarray(class_tasks(ctx))

    def ncm(cl, x):
        f = query(cl, x)
        f = f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-8)
        mu = state(cl, name)["class_means"]
        mu = mu / (jnp.linalg.norm(mu, axis=-1, keepdims=True) + 1e-8)
        ok = cl.extra[trained][class_task]
        d = jnp.where(ok[None], jnp.sum((f[:, None] - mu[None]) ** 2, -1), jnp.inf)
        return class_task[jnp.argmin(d, axis=-1)]

    every = {"ncm": ncm, **(rules or {})}
    infer = every[rule]
    features = jax.jit(query)

    def wrap(inner):
        return lambda cl, x, tid: inner(cl, x, infer(cl, x) if tid is None else tid)

    def end_task(cl, data):
        feats = np.concatenate([np.asarray(features(cl, data.x[i:i + 256])) for i in range(0, len(data.y), 256)])
        means = state(cl, name)["class_means"]
        for c in np.unique(data.y):
            means = means.at[int(c)].set(jnp.asarray(feats[data.y == c].mean(0)))
        return with_state(cl, name, {"class_means": means})

    def test_report(cl, bench):
        tasks = [(jnp.asarray(t.x_test), t.targets(t.y_test, "cil"),
                  jnp.full((len(t.y_test),), t.task_id, jnp.int32)) for t in bench.tasks]
        n = sum(len(y) for _, y, _ in tasks)
        tid_ok, cls_ok = {}, {}
        for r, fn in every.items():
            infer_r = jax.jit(fn)
            pred_r = jax.jit(lambda cl, x, fn=fn: jnp.argmax(predict(cl, x, fn(cl, x)), -1))
            tid_ok[r] = sum(int(jnp.sum(infer_r(cl, x) == tid)) for x, _, tid in tasks) / n
            cls_ok[r] = sum(int(jnp.sum(pred_r(cl, x) == y)) for x, y, _ in tasks) / n
        return {"task_inference": {"rule": rule, "task_id_accuracy": tid_ok, "class_accuracy": cls_ok}}

    dim = ctx.backbone.feature_dim
    return Transform(name, init=lambda key, cl: {"class_means": jnp.zeros((ctx.num_outputs, dim), jnp.float32)},
                     predict=wrap, end_task=end_task, test_report=test_report, scenarios=("cil",),
                     owns=("task_inference",))
