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

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.methods.frozen import PRETRAIN_DEFAULTS, PRETRAIN_HELP, PRETRAIN_RULES, frozen_backbone
from clax.settings import Rule, check_settings
from clax.transforms import frozen, reprogram

CLR_DEFAULTS = {"kernel_size": 3, "full": False, **{**PRETRAIN_DEFAULTS, "pretrain_steps": 120}}
CLR_RULES = {"kernel_size": Rule("int", lambda v: v >= 1 and v % 2 == 1, "a positive odd number"), **PRETRAIN_RULES}
#: one line per setting, as ``clax list clr`` prints it
CLR_HELP = {"kernel_size": "kernel size of the per-task depthwise reprogramming convolutions",
            "full": "also reprogram after the 1x1 convolutions (CLR-full)", **PRETRAIN_HELP}


def clr(ctx: Context, **settings) -> Method:
    """CLR with settings ``kernel_size`` (of the depthwise layers), ``full`` (also wrap 1x1
    convolutions) and the pretraining settings of :data:`clax.methods.frozen.PRETRAIN_DEFAULTS`."""
    s = check_settings("clr", CLR_DEFAULTS, settings, CLR_RULES)
    if ctx.scenario != "til":
        raise ValueError(f"method 'clr' supports scenario 'til' only (its task id picks the reprogramming), "
                         f"got scenario {ctx.scenario!r}")
    k, full = int(s["kernel_size"]), bool(s["full"])
    # the reprogramming's own checks (kernel size, a convolution to wrap) on the backbone's shapes, before
    # any pretraining
    jax.eval_shape(lambda key: reprogram.init(ctx.backbone.init(key)[0], ctx.num_tasks, k, full),
                   jax.random.PRNGKey(0))
    params, stats, pre_report = frozen_backbone(ctx, s, "clr")
    return chain(reprogram.model(ctx, params, stats, k, full, name="clr"), reprogram.statistics(),
                 frozen.trained(ctx.num_tasks), frozen.pretrained(pre_report), name="clr")
