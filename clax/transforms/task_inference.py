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

Batchwise vote (opt-in, ``vote=N``; Soft-TF's ``batch_vote``): the rule's per-sample ids are replaced,
in each group of ``N`` consecutive rows of a prediction batch, by their majority (:func:`majority`; a tie
goes to the lower task id). This is how the CIL figures of Soft-TF's authors (and DualPrompt's
``batchwise_prompt``) are computed: their test loader gives batches of 24 images of one task, and every
image of a batch runs under the task most of its rows matched. It is **not a per-sample CIL protocol**:
it uses the composition of the test batch (all rows of one task, consecutive), which leaks the task
identity; a stream whose test batches mix tasks would see a different accuracy. With ``vote`` the
accuracy matrix is computed with the vote (groups of ``N`` rows inside each evaluation batch of
``train.eval_batch_size`` rows, or fewer on small test sets, :func:`clax.train.eval_batch_rows`, whose
padding rows, copies of its first rows, vote too: set
``train.eval_batch_size`` to ``N`` for the authors' batches), and the report gives both rules' figures,
per sample and batchwise (each task's test set cut into consecutive groups of ``N``, the last shorter,
as the authors' loader does).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clax.compose import NEG, Transform, state, with_state
from clax.data.stream import map_rows


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


def majority(ids: jax.Array, group: int, num_tasks: int) -> jax.Array:
    """``ids [B]`` (task ids in ``0..num_tasks-1``) with each group of ``group`` consecutive rows (the last
    group shorter where ``group`` does not divide ``B``) replaced by the group's most frequent id (a tie
    goes to the lowest id): the batchwise vote (see the module docstring; it uses the test batch's
    composition, not a per-sample rule)."""
    b = ids.shape[0]
    seg = jnp.arange(b) // group
    n = -(-b // group)
    counts = jax.ops.segment_sum(jax.nn.one_hot(ids, num_tasks, dtype=jnp.int32), seg, num_segments=n)  # [G, T]
    return jnp.argmax(counts, axis=-1).astype(jnp.int32)[seg]


def task_inference(ctx, query: Callable, predict: Callable, rule: str = "ncm", rules: dict | None = None,
                   name: str = "task_inference", trained: str = "trained", vote: int = 0) -> Transform:
    """Task-id inference in CIL as a :class:`clax.compose.Transform` (owns ``task_inference``).

    Args:
      ctx: the stream's :class:`clax.methods.base.Context`.
      query: ``(cl, x) -> [B, D]`` the features NCM compares (the frozen backbone's own).
      predict: the model's ``(cl, x, tid) -> logits`` (for the report's class accuracy).
      rule: the rule prediction uses: ``"ncm"`` or a key of ``rules``.
      rules: further rules ``{name: (cl, x) -> [B]}`` (e.g. ``{"entropy": entropy(...)}``).
      vote: 0 (per sample) or ``N``: prediction takes the majority of the rule's ids over each group of
        ``N`` consecutive rows (:func:`majority`; uses the test batch's composition, see the module
        docstring).

    State ``cl.extra[name] = {"class_means": [K, D]}`` (NCM's, set at the end of each task). The
    prediction wrapper infers ``tid`` where it is None; ``test_report`` gives ``task_inference``:
    the rule, and per rule the task-id and class accuracy on every task's test set; with ``vote`` also
    ``vote`` (``N``), ``task_id_accuracy_batchwise`` and ``class_accuracy_batchwise``.
    """
    if isinstance(vote, bool) or not isinstance(vote, int) or vote < 0:
        raise ValueError(f"task-inference vote must be an integer >= 0 (0: per sample), got {vote!r}")
    T = ctx.num_tasks
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
    per_sample = every[rule]
    infer = (lambda cl, x: majority(per_sample(cl, x), vote, T)) if vote else per_sample
    features = jax.jit(query)

    def wrap(inner):
        return lambda cl, x, tid: inner(cl, x, infer(cl, x) if tid is None else tid)

    def end_task(cl, data):
        feats = map_rows(lambda xb: features(cl, xb), data.x)  # fixed-size batches: one compilation
        means = state(cl, name)["class_means"]
        for c in np.unique(data.y):
            means = means.at[int(c)].set(jnp.asarray(feats[data.y == c].mean(0)))
        return with_state(cl, name, {"class_means": means})

    def test_report(cl, bench, accuracy=None):  # its own programs: task ids, not only accuracies
        # every rule is per sample: every task's test set goes through in one pass of fixed-size batches
        # (map_rows), so each function compiles once and only the last batch of all is padded
        x = [t.x_test for t in bench.tasks]
        y = np.concatenate([t.targets(t.y_test, "cil") for t in bench.tasks])
        tid = np.concatenate([np.full((len(t.y_test),), t.task_id, np.int32) for t in bench.tasks])
        ends = np.cumsum([len(t.y_test) for t in bench.tasks])[:-1]
        tid_ok, cls_ok = {}, {}
        tid_vote, cls_vote = {}, {}
        pred_v = jax.jit(lambda cl, x, ids: jnp.argmax(predict(cl, x, ids), -1))
        for r, fn in every.items():
            infer_r = jax.jit(fn)
            inferred = map_rows(lambda xb: infer_r(cl, xb), x)
            tid_ok[r] = int(np.sum(inferred == tid)) / len(y)
            # the class predicted under the task ids just inferred (one compiled predict for every rule)
            cls_ok[r] = int(np.sum(map_rows(lambda xb, ib: pred_v(cl, xb, ib), x, inferred) == y)) / len(y)
            if vote:  # each task's test set in consecutive groups of `vote` rows, the last one shorter
                ids = np.concatenate([np.asarray(majority(jnp.asarray(i), vote, T)) for i in np.split(inferred, ends)])
                tid_vote[r] = int(np.sum(ids == tid)) / len(y)
                cls_vote[r] = int(np.sum(map_rows(lambda xb, ib: pred_v(cl, xb, ib), x, ids) == y)) / len(y)
        out = {"rule": rule, "task_id_accuracy": tid_ok, "class_accuracy": cls_ok}
        if vote:
            out.update(vote=vote, task_id_accuracy_batchwise=tid_vote, class_accuracy_batchwise=cls_vote)
        return {"task_inference": out}

    dim = ctx.backbone.feature_dim
    return Transform(name, init=lambda key, cl: {"class_means": jnp.zeros((ctx.num_outputs, dim), jnp.float32)},
                     predict=wrap, end_task=end_task, test_report=test_report, scenarios=("cil",),
                     owns=("task_inference",))
