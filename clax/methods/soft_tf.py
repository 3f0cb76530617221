"""Soft-TF: Soft-Transformers for continual learning (Kang & Yoo, arXiv 2411.16073).

A pretrained ViT is frozen, all of it. In the chosen blocks (setting ``masked_blocks``: the last
``n``, default 3; or any regex ``mask_filter`` over parameter paths) the attention ``qkv`` and ``proj``
and the MLP ``fc1`` and ``fc2`` weights get a per-task real-valued mask of their full shape, initialised
uniform in [0.99, 1.0]: task ``t`` runs with ``W_t = M_t * W`` (:mod:`clax.transforms.soft_mask`).
With ``binary=True`` task ``t`` instead learns scores and keeps the top ``keep`` fraction of each
weight with a straight-through gradient (:mod:`clax.transforms.binary_mask`, as in WSN); scores start at
``|W| * U(0.99, 1)`` so the first kept set is the largest weights. Each task has its own linear head
(other tasks' outputs masked); the loss is cross-entropy with ``label_smoothing`` over the task's
classes. The authors also add DualPrompt prompts; clax does not (noted in the README).

Zero forgetting: only row ``t`` of the masks and heads is trained in task ``t``; at the end of the task
the row is replaced by what is stored (the soft mask rounded to ``mask_precision``, or the hard binary
mask), so evaluation always uses the stored model. Stored bytes per task (``Method.task_bytes``): soft
masks at ``mask_precision``, binary masks bit-packed, plus the head.

CIL: the task id is inferred per sample, by ``task_inference``:
  * ``"entropy"``: the one-shot rule of SupSup — superimpose the trained tasks' masks and heads with
    weights ``alpha = 1/T_seen``, and pick the task with the largest ``-d(entropy)/d(alpha_t)``
    (one forward-mode derivative per task);
  * ``"ncm"``: nearest class mean of the frozen (unmasked) backbone's L2-normalised CLS features,
    means taken over each task's training data at its end.
results.json reports the task-id accuracy and the class accuracy of both rules (``task_inference``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax.traverse_util import flatten_dict

from clax import partition as P
from clax.methods.base import Context, Method, TaskData
from clax.methods.frozen import PRETRAIN_DEFAULTS, by_task, check_trained, frozen_backbone, mark_trained
from clax.partition import CLState
from clax.transforms import binary_mask, classifier, soft_mask

SOFT_TF_DEFAULTS = {"masked_blocks": 3, "mask_filter": "", "binary": False, "keep": 0.9,
                    "mask_precision": "int8", "label_smoothing": 0.1, "task_inference": "ncm",
                    **{**PRETRAIN_DEFAULTS, "pretrain_steps": 300}}
INFERENCE_RULES = ("ncm", "entropy")


def block_filter(params, n: int) -> str:
    """The regex selecting qkv, proj, fc1 and fc2 kernels of the last ``n`` ViT blocks of ``params``."""
    depth = sum(1 for k in params if str(k).startswith("blocks_"))
    if depth == 0:
        raise ValueError("soft_tf.masked_blocks needs a ViT backbone (parameters blocks_0, blocks_1, ...); "
                         "set soft_tf.mask_filter for other backbones")
    if not 1 <= n <= depth:
        raise ValueError(f"soft_tf.masked_blocks must be in 1..{depth} (the backbone's blocks), got {n}")
    ids = "|".join(str(i) for i in range(depth - n, depth))
    return rf"^blocks_({ids})/(attn/(qkv|proj)|mlp/(fc1|fc2))/kernel$"


def soft_tf(ctx: Context, **settings) -> Method:
    """Soft-TF with the settings of :data:`SOFT_TF_DEFAULTS` (see the module docstring)."""
    s = {**SOFT_TF_DEFAULTS, **settings}
    if s["task_inference"] not in INFERENCE_RULES:
        raise ValueError(f"soft_tf.task_inference must be one of {', '.join(INFERENCE_RULES)}, "
                         f"got {s['task_inference']!r}")
    if s["mask_precision"] not in soft_mask.PRECISIONS:
        raise ValueError(f"soft_tf.mask_precision must be one of {', '.join(soft_mask.PRECISIONS)}, "
                         f"got {s['mask_precision']!r}")
    if not 0.0 <= float(s["label_smoothing"]) < 1.0:
        raise ValueError(f"soft_tf.label_smoothing must be in [0, 1), got {s['label_smoothing']}")
    binary = bool(s["binary"])
    keep = binary_mask.check_fraction("soft_tf.keep", s["keep"]) if binary else None
    T, C, cil = ctx.num_tasks, ctx.num_outputs, ctx.scenario == "cil"
    params, stats, pre_report = frozen_backbone(ctx, s)
    filt = s["mask_filter"] or block_filter(params, int(s["masked_blocks"]))
    soft_mask.select(params, filt)  # a filter that matches nothing is refused here, naming it
    out_mask = ctx.output_mask()                                     # [T, C]
    class_task = np.full(C, -1, np.int32)                            # CIL: the task of each class
    if cil:
        for t, cs in enumerate(ctx.task_classes):
            class_task[cs[cs >= 0]] = t
    smooth = float(s["label_smoothing"])
    apply_bb = ctx.backbone.apply

    def init(key):
        km, kh = jax.random.split(key)
        masks = soft_mask.init(km, params, filt, T)
        if binary:  # scores: |W| * U(0.99, 1), so the first kept set is the largest weights
            flat = flatten_dict(params)
            masks = {k: masks[k] * jnp.abs(flat[p]) for k, p in soft_mask.select(params, filt).items()}
        head = jax.vmap(lambda k: classifier.init_head(k, ctx.backbone.feature_dim, C))(jax.random.split(kh, T))
        extra = {"trained": jnp.zeros((T,), bool)}
        if cil:
            extra["class_means"] = jnp.zeros((C, ctx.backbone.feature_dim), jnp.float32)
        return CLState(frozen={"backbone": params}, shared={}, per_task={"mask": masks, "head": head},
                       state={"backbone": stats}, extra=extra)

    def effective(m):
        """A task's masks as the forward pass uses them (binary: the top-``keep`` set, STE)."""
        return {k: binary_mask.top_fraction_ste(v, keep) for k, v in m.items()} if binary else m

    def features(cl, masks_row, x):
        f, _ = apply_bb(soft_mask.apply(cl.frozen["backbone"], masks_row), cl.state["backbone"], x, False)
        return f

    def task_logits(cl, x, t):
        """Task ``t``'s logits ``[B, C]`` (t a scalar), other tasks' outputs masked."""
        pt = cl.per_task
        f = features(cl, effective(soft_mask.row(pt["mask"], t)), x)
        logits = f @ pt["head"]["kernel"][t] + pt["head"]["bias"][t]
        return jnp.where(out_mask[t], logits, classifier.NEG)

    def loss(cl, batch, key, t):
        logits = task_logits(cl, batch["x"], t)
        valid = out_mask[t].astype(jnp.float32)
        target = (1 - smooth) * jax.nn.one_hot(batch["y"], C) + smooth * valid / jnp.sum(valid)
        ce = jnp.mean(optax.softmax_cross_entropy(logits, target))
        return ce, (cl.state, {"loss": ce, "ce": ce})

    # ----- task-id inference (CIL) -----
    def infer_ncm(cl, x):
        f, _ = apply_bb(cl.frozen["backbone"], cl.state["backbone"], x, False)
        f = f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-8)
        mu = cl.extra["class_means"]
        mu = mu / (jnp.linalg.norm(mu, axis=-1, keepdims=True) + 1e-8)
        ok = cl.extra["trained"][jnp.asarray(class_task)]
        d = jnp.where(ok[None], jnp.sum((f[:, None] - mu[None]) ** 2, -1), jnp.inf)
        return jnp.asarray(class_task)[jnp.argmin(d, axis=-1)]

    def infer_entropy(cl, x):
        trained = cl.extra["trained"]
        alpha0 = trained.astype(jnp.float32) / jnp.maximum(jnp.sum(trained), 1)
        pt = cl.per_task
        hard = jax.vmap(lambda m: {k: binary_mask.top_fraction(v, keep) for k, v in m.items()})(pt["mask"]) \
            if binary else pt["mask"]
        cols = out_mask.astype(jnp.float32)                                        # [T, C]
        valid = jnp.any(out_mask & trained[:, None], axis=0)

        def entropy(alpha):
            f = features(cl, soft_mask.superimpose(hard, alpha), x)
            w = jnp.einsum("t,tdc,tc->dc", alpha, pt["head"]["kernel"], cols)
            b = jnp.einsum("t,tc,tc->c", alpha, pt["head"]["bias"], cols)
            logp = jax.nn.log_softmax(jnp.where(valid, f @ w + b, classifier.NEG))
            return -jnp.sum(jnp.exp(logp) * logp, axis=-1)                        # [B]

        grad = jax.jacfwd(entropy)(alpha0)                                         # [B, T]
        return jnp.argmax(jnp.where(trained[None], -grad, -jnp.inf), axis=-1).astype(jnp.int32)

    def infer(cl, x, rule):
        return infer_ncm(cl, x) if rule == "ncm" else infer_entropy(cl, x)

    def predict_with(cl, x, tid, rule):
        if tid is None:
            if not cil:
                raise ValueError("method 'soft_tf' in TIL needs task ids")
            tid = infer(cl, x, rule)
        else:
            check_trained(cl, tid)
        return by_task(lambda t: task_logits(cl, x, t), tid, T)

    def predict(cl, x, tid):
        return predict_with(cl, x, tid, s["task_inference"])

    @jax.jit
    def frozen_features(cl, x):
        return apply_bb(cl.frozen["backbone"], cl.state["backbone"], x, False)[0]

    def end_task(cl, data: TaskData):
        t = data.t
        pt = cl.per_task
        row = soft_mask.row(pt["mask"], t)
        if binary:
            stored = {k: binary_mask.top_fraction(v, keep) for k, v in row.items()}
        else:
            stored = {k: soft_mask.quantize(v, s["mask_precision"]) for k, v in row.items()}
        cl = cl.replace(per_task={**pt, "mask": {k: pt["mask"][k].at[t].set(v) for k, v in stored.items()}})
        if cil:
            feats = np.concatenate([np.asarray(frozen_features(cl, data.x[i:i + 256]))
                                    for i in range(0, len(data.y), 256)])
            means = cl.extra["class_means"]
            for c in np.unique(data.y):
                means = means.at[int(c)].set(jnp.asarray(feats[data.y == c].mean(0)))
            cl = cl.replace(extra={**cl.extra, "class_means": means})
        return mark_trained(cl, t)

    def task_bytes(cl, t):
        # The trainer counts the per-task row at float32; masks are stored at mask_precision
        # (binary: one bit per weight), so this is the (negative) difference.
        stored = sum(binary_mask.packed_nbytes(m.shape[1:]) if binary
                     else soft_mask.stored_nbytes(m.shape[1:], s["mask_precision"])
                     for m in cl.per_task["mask"].values())
        return stored - P.nbytes(P.task_row(cl.per_task["mask"], 0))

    def report(cl):
        return {"pretrain": pre_report, "masked": sorted(cl.per_task["mask"])}

    def on_test_sets(cl, bench):
        return test_report(cl, bench, ctx, predict_with, infer, s)

    return Method("soft_tf", init, loss, predict, end_task=end_task, task_bytes=task_bytes, report=report,
                  test_report=on_test_sets)


def test_report(cl: CLState, bench, ctx: Context, predict_with, infer, s: dict) -> dict:
    """Figures on every task's test set after the last task: in CIL the task-id accuracy and the class
    accuracy of each inference rule; in both scenarios the accuracy with masks rounded to each
    precision (to choose ``mask_precision``; meaningful on a run with ``mask_precision=float32``)."""
    out: dict = {}
    rules = INFERENCE_RULES if ctx.scenario == "cil" else ()
    tasks = [(jnp.asarray(t.x_test), t.targets(t.y_test, ctx.scenario),
              jnp.full((len(t.y_test),), t.task_id, jnp.int32)) for t in bench.tasks]
    n = sum(len(y) for _, y, _ in tasks)
    if rules:
        tid_ok, cls_ok = {}, {}
        for r in rules:
            infer_r = jax.jit(lambda cl, x, r=r: infer(cl, x, r))
            pred_r = jax.jit(lambda cl, x, r=r: jnp.argmax(predict_with(cl, x, None, r), -1))
            tid_ok[r] = sum(int(jnp.sum(infer_r(cl, x) == tid)) for x, _, tid in tasks) / n
            cls_ok[r] = sum(int(jnp.sum(pred_r(cl, x) == y)) for x, y, _ in tasks) / n
        out["task_inference"] = {"rule": s["task_inference"], "task_id_accuracy": tid_ok, "class_accuracy": cls_ok}
    if not s["binary"]:
        rule = s["task_inference"]
        pred = jax.jit(lambda cl, x, tid: jnp.argmax(predict_with(cl, x, tid, rule), -1))
        acc = {}
        for prec in soft_mask.PRECISIONS:
            q = cl.replace(per_task={**cl.per_task, "mask": {
                k: jax.vmap(lambda m: soft_mask.quantize(m, prec))(v) for k, v in cl.per_task["mask"].items()}})
            acc[prec] = sum(int(jnp.sum(pred(q, x, None if rules else tid) == y)) for x, y, tid in tasks) / n
        out["accuracy_by_mask_precision"] = acc
    return out
