"""CLR: Channel-wise Lightweight Reprogramming (Ge et al., ICCV 2023, arXiv 2307.11386).

A pretrained CNN is frozen. Task ``t`` owns a depthwise 3x3 convolution after every frozen
convolution with a kernel larger than 1x1 (all of them with ``full=True``, "CLR-full"), initialised to
the identity; its own BatchNorm scale, bias and running statistics; and its own linear head. The
method is the composition :func:`clax.transforms.reprogram.reprogrammed` ∘
:func:`clax.transforms.reprogram.task_batchnorm` over the backbone's apply, plus a per-task head.

State: ``frozen["backbone"]`` (the pretrained weights), ``per_task`` = ``reprogram {path: [T, 3, 3, C]}``,
``bn {path: {scale, bias: [T, C]}}`` and ``head {kernel [T, D, C], bias [T, C]}``;
``state["bn"] {path: {mean, var: [T, C]}}``; ``extra["trained"] [T]``. Only row ``t`` is trained or
updated during task ``t``, so every earlier task's outputs stay bit-for-bit unchanged.

TIL only: the task id picks the reprogramming, the BatchNorm and the head. Where the frozen backbone
comes from: a checkpoint given as ``backbone.pretrained=PATH`` is frozen exactly as loaded (the BatchNorm
rows start from its scale, bias and running statistics); without one, setting ``pretrained``
(``"auto"``, the default, and ``"glyphs"``: offline pretraining on synthetic glyphs, see
:mod:`clax.pretrain`; ``"none"``: the random initialisation; a ``.msgpack`` path) with
``pretrain_steps``, ``pretrain_seed``, ``pretrain_dir``. ``pretrained="glyphs"`` together with a
checkpoint is refused. results.json's ``pretrain`` names the source (a file with its SHA-256).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clax import partition as P
from clax.methods.base import Context, Method, TaskData
from clax.methods.frozen import PRETRAIN_DEFAULTS, PRETRAIN_RULES, by_task, check_trained, frozen_backbone, mark_trained
from clax.partition import CLState
from clax.settings import Rule, check_settings
from clax.transforms import classifier, reprogram

CLR_DEFAULTS = {"kernel_size": 3, "full": False, **{**PRETRAIN_DEFAULTS, "pretrain_steps": 120}}
CLR_RULES = {"kernel_size": Rule("int", lambda v: v >= 1 and v % 2 == 1, "a positive odd number"), **PRETRAIN_RULES}


def clr(ctx: Context, **settings) -> Method:
    """CLR with settings ``kernel_size`` (of the depthwise layers), ``full`` (also wrap 1x1
    convolutions) and the pretraining settings of :data:`clax.methods.frozen.PRETRAIN_DEFAULTS`."""
    s = check_settings("clr", CLR_DEFAULTS, settings, CLR_RULES)
    if ctx.scenario != "til":
        raise ValueError(f"method 'clr' supports scenario 'til' only (its task id picks the reprogramming), "
                         f"got scenario {ctx.scenario!r}")
    T = ctx.num_tasks
    # the reprogramming's own checks (kernel size, a convolution to wrap) on the backbone's shapes, before
    # any pretraining
    jax.eval_shape(lambda k: reprogram.init(ctx.backbone.init(k)[0], T, int(s["kernel_size"]), bool(s["full"])),
                   jax.random.PRNGKey(0))
    params, stats, pre_report = frozen_backbone(ctx, s, "clr")
    module = ctx.backbone.module
    out_mask = ctx.output_mask()

    def init(key):
        bn_p, bn_s = reprogram.init_batchnorm(params, stats, T)
        head = jax.vmap(lambda k: classifier.init_head(k, ctx.backbone.feature_dim, ctx.num_outputs))(
            jax.random.split(key, T))
        per_task = {"reprogram": reprogram.init(params, T, int(s["kernel_size"]), bool(s["full"])),
                    "bn": bn_p, "head": head}
        return CLState(frozen={"backbone": params}, shared={}, per_task=per_task, state={"bn": bn_s},
                       extra={"trained": jnp.zeros((T,), bool)})

    def run_backbone(p, x, train):
        return module.apply({"params": p}, x, train=train)

    def forward(cl, x, t, train):
        """Task ``t``'s logits ``[B, C]`` (t a scalar) and its updated BatchNorm statistics."""
        pt = cl.per_task
        fn = reprogram.task_batchnorm(reprogram.reprogrammed(run_backbone, pt["reprogram"], t),
                                      pt["bn"], cl.state["bn"], t)
        f, new_stats = fn(cl.frozen["backbone"], x, train)
        logits = f @ pt["head"]["kernel"][t] + pt["head"]["bias"][t]
        return jnp.where(out_mask[t], logits, classifier.NEG), new_stats

    def loss(cl, batch, key, t):
        logits, new_stats = forward(cl, batch["x"], t, True)
        ce = classifier.cross_entropy(logits, batch["y"])
        bn = jax.tree.map(lambda a, r: a.at[t].set(r), cl.state["bn"], new_stats) if new_stats else cl.state["bn"]
        return ce, ({**cl.state, "bn": bn}, {"loss": ce, "ce": ce})

    def predict(cl, x, tid):
        if tid is None:
            raise ValueError("method 'clr' needs task ids (TIL)")
        check_trained(cl, tid)
        return by_task(lambda t: forward(cl, x, t, False)[0], tid, T)

    def end_task(cl, data: TaskData):
        return mark_trained(cl, data.t)

    def task_bytes(cl, t):
        return P.nbytes(P.task_row(cl.state["bn"], t))  # the task's BatchNorm statistics

    def report(cl):
        return {"pretrain": pre_report}

    return Method("clr", init, loss, predict, end_task=end_task, task_bytes=task_bytes, report=report)
