"""Soft-TF: Soft-Transformers for continual learning (Kang & Yoo, arXiv 2411.16073).

A pretrained ViT is frozen, all of it. In the chosen blocks (setting ``masked_blocks``: the last
``n``, default 3; or any regex ``mask_filter`` over parameter paths) the attention ``qkv`` and ``proj``
and the MLP ``fc1`` and ``fc2`` weights get a per-task real-valued mask of their full shape, initialised
uniform in [0.99, 1.0]: task ``t`` runs with ``W_t = M_t * W`` (:mod:`clax.transforms.soft_mask`).
With ``binary=True`` task ``t`` instead learns scores and keeps the top ``keep`` fraction of each
weight with a straight-through gradient (:mod:`clax.transforms.binary_mask`, as in WSN); scores start at
``|W| * U(0.99, 1)`` so the first kept set is the largest weights. Each task has its own linear head
(other tasks' outputs masked); the loss is cross-entropy with ``label_smoothing`` over the task's
classes.

DualPrompt prompts (opt-in, ``prompts=True``; the authors' combination, :mod:`clax.transforms.prompt`):
prefix-tuning prompts of ``prompt_length`` tokens (key- and value-prefixes prepended to attention keys
and values). G-prompts at blocks ``g_prompt_layers`` are shared by all tasks (partition ``shared``);
E-prompts at blocks ``e_prompt_layers`` and one key per task are per-task rows (``per_task``). Negative
layer indices count from the last block, so the default ``[-3, -2, -1]`` is blocks 9-11 of ViT-B/16,
the masked blocks. The loss adds ``key_loss_weight * (1 - cos(q, key_t))`` (DualPrompt's pull
constraint, coefficient 1.0), ``q`` the frozen backbone's CLS feature (no masks, no prompts). A new
task's E-prompt starts as a copy of the previous task's (the authors' ``shared_prompt_pool``); its key
does not. The authors train the G-prompts in every task (their Table-1 script passes ``--no_pgp``, so
without gradient projection), which forgets; clax by default trains them in the first task only
(``g_prompt_tasks="first"``: the update of ``shared`` is masked out afterwards), so zero forgetting
still holds exactly; ``g_prompt_tasks="all"`` is the authors' schedule.

Zero forgetting: only row ``t`` of the masks and heads is trained in task ``t``; at the end of the task
the row is replaced by what is stored (the soft mask rounded to ``mask_precision``, or the hard binary
mask), so evaluation always uses the stored model. Stored bytes per task (``Method.task_bytes``): soft
masks at ``mask_precision``, binary masks bit-packed, plus the head.

CIL: the task id is inferred per sample, by ``task_inference``:
  * ``"entropy"``: the one-shot rule of SupSup — superimpose the trained tasks' masks and heads with
    weights ``alpha = 1/T_seen``, and pick the task with the largest ``-d(entropy)/d(alpha_t)``
    (one forward-mode derivative per task);
  * ``"ncm"``: nearest class mean of the frozen (unmasked) backbone's L2-normalised CLS features,
    means taken over each task's training data at its end;
  * ``"prompt"`` (needs ``prompts=True``): DualPrompt's key matching, the trained task whose E-key is
    most cosine-similar to the frozen CLS feature (per sample; DualPrompt's "batchwise" majority vote
    over a test batch assumes single-task batches and is not used).
With prompts, ``"entropy"`` superimposes the E-prompts with the same weights ``alpha`` as the masks.
results.json reports the task-id accuracy and the class accuracy of every available rule
(``task_inference``).

The frozen ViT: a checkpoint given as ``backbone.pretrained=PATH`` is frozen exactly as loaded; without
one, setting ``pretrained`` (``"auto"``, the default, and ``"glyphs"``: offline pretraining on synthetic
glyphs, :mod:`clax.pretrain`; ``"none"``: the random initialisation; a ``.msgpack`` path) with
``pretrain_steps``, ``pretrain_seed``, ``pretrain_dir``. ``pretrained="glyphs"`` together with a
checkpoint is refused. results.json's ``pretrain`` names the source (a file with its SHA-256).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax.traverse_util import flatten_dict

from clax import partition as P
from clax.methods.base import Context, Method, TaskData
from clax.methods.frozen import PRETRAIN_DEFAULTS, PRETRAIN_RULES, by_task, check_trained, frozen_backbone, mark_trained
from clax.partition import CLState
from clax.settings import FRACTION, NON_NEGATIVE, POSITIVE_INT, REGEX, between, check_settings, one_of
from clax.transforms import binary_mask, classifier, prompt, soft_mask

SOFT_TF_DEFAULTS = {"masked_blocks": 3, "mask_filter": "", "binary": False, "keep": 0.9,
                    "mask_precision": "int8", "label_smoothing": 0.1, "task_inference": "ncm",
                    "prompts": False, "prompt_length": 5, "g_prompt_layers": [0, 1], "e_prompt_layers": [-3, -2, -1],
                    "g_prompt_tasks": "first", "key_loss_weight": 1.0,
                    **{**PRETRAIN_DEFAULTS, "pretrain_steps": 300}}
INFERENCE_RULES = ("ncm", "entropy", "prompt")  # "prompt" only with prompts=True
G_PROMPT_TASKS = ("first", "all")
SOFT_TF_RULES = {"masked_blocks": POSITIVE_INT, "mask_filter": REGEX, "keep": FRACTION,
                 "mask_precision": one_of(*soft_mask.PRECISIONS), "label_smoothing": between(0, 1, "[)"),
                 "task_inference": one_of(*INFERENCE_RULES), "g_prompt_tasks": one_of(*G_PROMPT_TASKS),
                 "key_loss_weight": NON_NEGATIVE, **PRETRAIN_RULES}


def inference_rules(s: dict) -> tuple[str, ...]:
    """The task-id inference rules available under settings ``s``."""
    return tuple(r for r in INFERENCE_RULES if r != "prompt" or s["prompts"])


def check_prompt_settings(s: dict) -> None:
    """Raises ValueError naming a bad prompt setting (those that need no backbone)."""
    if s["task_inference"] == "prompt" and not s["prompts"]:
        raise ValueError("soft_tf.task_inference='prompt' (key matching) needs soft_tf.prompts=true")
    if not s["prompts"]:
        return
    if int(s["prompt_length"]) < 1:
        raise ValueError(f"soft_tf.prompt_length must be >= 1, got {s['prompt_length']}")
    if not s["e_prompt_layers"]:
        raise ValueError("soft_tf.e_prompt_layers must name at least one block (the E-prompts carry the task keys)")
    if s["g_prompt_tasks"] not in G_PROMPT_TASKS:
        raise ValueError(f"soft_tf.g_prompt_tasks must be one of {', '.join(G_PROMPT_TASKS)}, "
                         f"got {s['g_prompt_tasks']!r}")
    if not float(s["key_loss_weight"]) >= 0.0:
        raise ValueError(f"soft_tf.key_loss_weight must be >= 0, got {s['key_loss_weight']}")


def vit_depth(params) -> int:
    """The number of ViT blocks (``blocks_0``, ``blocks_1``, ...) in ``params``."""
    return sum(1 for k in params if str(k).startswith("blocks_"))


def block_filter(params, n: int) -> str:
    """The regex selecting qkv, proj, fc1 and fc2 kernels of the last ``n`` ViT blocks of ``params``."""
    depth = vit_depth(params)
    if depth == 0:
        raise ValueError("soft_tf.masked_blocks needs a ViT backbone (parameters blocks_0, blocks_1, ...); "
                         "set soft_tf.mask_filter for other backbones")
    if not 1 <= n <= depth:
        raise ValueError(f"soft_tf.masked_blocks must be in 1..{depth} (the backbone's blocks), got {n}")
    ids = "|".join(str(i) for i in range(depth - n, depth))
    return rf"^blocks_({ids})/(attn/(qkv|proj)|mlp/(fc1|fc2))/kernel$"


def soft_tf(ctx: Context, **settings) -> Method:
    """Soft-TF with the settings of :data:`SOFT_TF_DEFAULTS` (see the module docstring)."""
    s = check_settings("soft_tf", SOFT_TF_DEFAULTS, settings, SOFT_TF_RULES)
    check_prompt_settings(s)
    binary = bool(s["binary"])
    keep = binary_mask.check_fraction("soft_tf.keep", s["keep"]) if binary else None
    T, C, cil = ctx.num_tasks, ctx.num_outputs, ctx.scenario == "cil"
    # Settings that depend on the backbone's parameters are checked on their shapes, before any pretraining.
    shapes = jax.eval_shape(ctx.backbone.init, jax.random.PRNGKey(0))[0]
    filt = s["mask_filter"] or block_filter(shapes, int(s["masked_blocks"]))
    soft_mask.select(shapes, filt)  # a filter that matches nothing is refused here, naming it
    use_prompts = bool(s["prompts"])
    g_layers = e_layers = ()
    if use_prompts:
        depth = vit_depth(shapes)
        if depth == 0:
            raise ValueError("soft_tf.prompts needs a ViT backbone (parameters blocks_0, blocks_1, ...)")
        g_layers = prompt.resolve_layers("soft_tf.g_prompt_layers", s["g_prompt_layers"], depth)
        e_layers = prompt.resolve_layers("soft_tf.e_prompt_layers", s["e_prompt_layers"], depth)
        key_w = float(s["key_loss_weight"])
    params, stats, pre_report = frozen_backbone(ctx, s, "soft_tf")
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
        shared, per_task = {}, {"mask": masks, "head": head}
        if use_prompts:
            pr = prompt.init(jax.random.fold_in(key, 1), T, ctx.backbone.feature_dim, int(s["prompt_length"]),
                             g_layers, e_layers)
            per_task.update(e_prompt=pr["e"], e_key=pr["key"])
            if g_layers:
                shared["g_prompt"] = pr["g"]
        return CLState(frozen={"backbone": params}, shared=shared, per_task=per_task,
                       state={"backbone": stats}, extra=extra)

    def effective(m):
        """A task's masks as the forward pass uses them (binary: the top-``keep`` set, STE)."""
        return {k: binary_mask.top_fraction_ste(v, keep) for k, v in m.items()} if binary else m

    def features(cl, masks_row, x, e_row=None):
        """CLS features ``[B, dim]`` under one task's masks and (with prompts) E-prompts ``e_row``."""
        kw = {}
        if use_prompts:
            kw["prompts"] = prompt.prefixes(cl.shared.get("g_prompt"), e_row, g_layers, e_layers)
        f, _ = apply_bb(soft_mask.apply(cl.frozen["backbone"], masks_row), cl.state["backbone"], x, False, **kw)
        return f

    def query(cl, x):
        """The frozen backbone's CLS feature ``[B, dim]`` (no masks, no prompts): NCM's and the keys' query."""
        return apply_bb(cl.frozen["backbone"], cl.state["backbone"], x, False)[0]

    def task_logits(cl, x, t):
        """Task ``t``'s logits ``[B, C]`` (t a scalar), other tasks' outputs masked."""
        pt = cl.per_task
        f = features(cl, effective(soft_mask.row(pt["mask"], t)), x, pt["e_prompt"][t] if use_prompts else None)
        logits = f @ pt["head"]["kernel"][t] + pt["head"]["bias"][t]
        return jnp.where(out_mask[t], logits, classifier.NEG)

    def loss(cl, batch, key, t):
        logits = task_logits(cl, batch["x"], t)
        valid = out_mask[t].astype(jnp.float32)
        target = (1 - smooth) * jax.nn.one_hot(batch["y"], C) + smooth * valid / jnp.sum(valid)
        ce = jnp.mean(optax.softmax_cross_entropy(logits, target))
        if not use_prompts:
            return ce, (cl.state, {"loss": ce, "ce": ce})
        pull = prompt.key_loss(query(cl, batch["x"]), cl.per_task["e_key"][t])
        total = ce + key_w * pull
        return total, (cl.state, {"loss": total, "ce": ce, "key_loss": pull})

    def update_mask(cl, t):
        """G-prompts (``shared``) move in the first task only; every per-task row moves freely."""
        return {"shared": jax.tree.map(lambda a: jnp.broadcast_to(t == 0, a.shape), cl.shared),
                "task": jax.tree.map(lambda a: jnp.ones(a.shape[1:], bool), cl.per_task)}

    def begin_task(cl, data: TaskData):
        if not use_prompts or data.t == 0:
            return cl
        e = cl.per_task["e_prompt"]  # the new task's E-prompt starts from the previous task's
        return cl.replace(per_task={**cl.per_task, "e_prompt": e.at[data.t].set(e[data.t - 1])})

    # ----- task-id inference (CIL) -----
    def infer_prompt(cl, x):
        return prompt.match(query(cl, x), cl.per_task["e_key"], cl.extra["trained"])

    def infer_ncm(cl, x):
        f = query(cl, x)
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
            e = jnp.tensordot(alpha, pt["e_prompt"], axes=1) if use_prompts else None
            f = features(cl, soft_mask.superimpose(hard, alpha), x, e)
            w = jnp.einsum("t,tdc,tc->dc", alpha, pt["head"]["kernel"], cols)
            b = jnp.einsum("t,tc,tc->c", alpha, pt["head"]["bias"], cols)
            logp = jax.nn.log_softmax(jnp.where(valid, f @ w + b, classifier.NEG))
            return -jnp.sum(jnp.exp(logp) * logp, axis=-1)                        # [B]

        grad = jax.jacfwd(entropy)(alpha0)                                         # [B, T]
        return jnp.argmax(jnp.where(trained[None], -grad, -jnp.inf), axis=-1).astype(jnp.int32)

    rules = {"ncm": infer_ncm, "entropy": infer_entropy, "prompt": infer_prompt}

    def infer(cl, x, rule):
        return rules[rule](cl, x)

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

    frozen_features = jax.jit(query)

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
        out = {"pretrain": pre_report, "masked": sorted(cl.per_task["mask"])}
        if use_prompts:
            out["prompts"] = {"length": int(s["prompt_length"]), "g_layers": list(g_layers),
                              "e_layers": list(e_layers), "g_prompt_tasks": s["g_prompt_tasks"]}
        return out

    def on_test_sets(cl, bench):
        return test_report(cl, bench, ctx, predict_with, infer, s)

    g_frozen_later = use_prompts and bool(g_layers) and s["g_prompt_tasks"] == "first"
    return Method("soft_tf", init, loss, predict, begin_task=begin_task, end_task=end_task,
                  update_mask=update_mask if g_frozen_later else None, task_bytes=task_bytes, report=report,
                  test_report=on_test_sets)


def test_report(cl: CLState, bench, ctx: Context, predict_with, infer, s: dict) -> dict:
    """Figures on every task's test set after the last task: in CIL the task-id accuracy and the class
    accuracy of each inference rule; in both scenarios the accuracy with masks rounded to each
    precision (to choose ``mask_precision``; meaningful on a run with ``mask_precision=float32``)."""
    out: dict = {}
    rules = inference_rules(s) if ctx.scenario == "cil" else ()
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
