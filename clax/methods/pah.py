"""PAH: Prototype-Augmented Hypernetworks (De La Fuente et al., arXiv 2505.07450), as a chain:

* :func:`clax.transforms.generated_head.model`: a shared, trained backbone whose per-task linear heads
  a small bias-free LeakyReLU hypernetwork generates from the task's prototypes (one learnable
  ``proto_size`` x ``proto_size`` x ``proto_channels`` image per class, default 10x10x1; the table
  ``cl.shared["protos"] [T, C, s * s * ch]``, each image flattened, is the task embedding): no head is
  stored;
* :func:`clax.transforms.proto_distill.two_step` (``proto_distill``): the KD of the old generated heads
  on the current batch against the teacher (the model after task ``t-1``), then the prototype step;
* :func:`clax.transforms.prototype.prototypes` (``prototypes``): semantic initialisation, the images
  it used dropped from training, the task's bytes;
* :func:`clax.transforms.lr_scale.lr_scale` (``backbone_lr``): the backbone learns at
  ``backbone_lr_scale`` times the trainer's rate (paper: 1e-4 vs 1e-3), a per-partition rate, so the
  checkpoint holds its real weights. (Before issue 13 it was stored divided by the scale; AdamW then
  decayed the real weights ten times the authors' and Adam's ``eps`` acted ten times larger on it.)

Where the paper is silent clax follows the authors' code (pah2025/PAH, ``train_hyper2d.py`` and
``networks/``) by default; each other choice is a setting, and the defaults are the authors' (paper:
alpha 0.5, T 2, 10x10x1 semantic prototypes):

* ``kd_direction``: ``"student_teacher"`` (default, the authors' ``distillation_output_loss``, clamped
  at 1e-10) or ``"teacher_student"`` (Hinton's direction, clax's before issue 11).
* The hypernetwork (the authors' ``HyperNetwork_seq`` / ``FCBlock``, ``hyper_hidden_layers=1``,
  ``hyper_hidden_features=16``): ``hidden=[16, 16]`` (their one "hidden layer" setting builds an input
  layer to 16 and one 16->16 layer), LeakyReLU (slope 0.01), no biases, the head ``logits = f @ W``
  bias-free (``TaskHead_simple``). ``hnet_init="kaiming"`` (default, theirs): Kaiming-normal layers,
  the last divided by 10, the raw output *is* the kernel; ``"affine"`` (clax before issue 11):
  LeCun-normal layers, the output mapped by :func:`clax.transforms.hypernet.layout`'s affine to a
  LeCun head's scale. ``head_bias=True`` (clax before issue 11) also generates a bias; ``hidden=[16]``
  gives clax's former single hidden layer.
* ``proto_input``: ``"resize"`` (default, the paper) or ``"native"`` (the authors' code: fed at
  ``proto_size``; image backbones that accept it only), see :mod:`clax.transforms.prototype`.
* ``bn``: ``"running"`` (default, clax: a prediction is a function of its image alone) or ``"batch"``
  (the authors' code, never in ``eval()``), see :mod:`clax.transforms.generated_head`.
* ``init``: ``semantic`` (the paper) or ``random`` (the ablation).

Where clax differs from the authors' code without a setting (the prototype step's gradient, the main
optimizer's state per task): :mod:`clax.transforms.proto_distill`. Their AdamW groups pass
``"weight_decay "`` (a trailing space, ignored), so every group decays at PyTorch's default 0.01:
``train.weight_decay=0.01`` (registry) and ``proto_weight_decay=0.01`` match that, the backbone's
decay, like its rate, ``backbone_lr_scale`` times the others' (as the authors' group with
``lr=1e-4``). The step's cost follows the tasks seen, not the stream's length ``T``
(``task_block``, clax's, default 2): the table is preallocated for all ``T`` tasks (fixed shapes, no
compilation at a new task), but the model's pass and the prototype step run over the shortest prefix
of ``task_block``, ``2 task_block``, ``4 task_block``, ... tasks that holds the old tasks and the
current one (one ``lax.switch``, at most twice the tasks seen), not over the whole masked table:
``benchmarks/pah_step.py``. A step gives the whole table's bits (``task_block >= T``, the computation
before issue 17; tested at ``task_block=2``); a whole split-digits run's parameters differ in the last
bits, its accuracy matrix is the same. ``task_block=1`` is allowed but a one-task prefix runs one-row
matrix products that round differently. TIL only.
"""
from __future__ import annotations

import jax
import numpy as np

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import NON_NEGATIVE, POSITIVE, POSITIVE_INT, WIDTHS, check_settings, one_of
from clax.transforms import generated_head, hypernet as H, lr_scale, proto_distill, prototype
from clax.transforms.classifier import init_head
from clax.transforms.distill import DIRECTIONS
from clax.transforms.generated_head import BN_MODES, kaiming_mlp_init  # noqa: F401 (re-exported)
from clax.transforms.prototype import PROTO_INPUTS, image_geometry, semantic_prototype  # noqa: F401

PAH_DEFAULTS = {
    "proto_size": 10,
    "proto_channels": 1,
    "init": "semantic",
    "hidden": [16, 16],  # the authors' hyper_hidden_layers=1 with hyper_hidden_features=16
    "alpha": 0.5,  # the paper's and the authors' KD weight ("stability")
    "temperature": 2.0,
    "kd_direction": "student_teacher",  # the authors' code; "teacher_student": Hinton's (clax before)
    "hnet_init": "kaiming",  # the authors' Kaiming-normal, last layer / 10; "affine": clax before
    "head_bias": False,  # the authors' bias-free generated head; True: clax before
    "proto_input": "resize",  # the paper; "native": the authors' code (prototypes at proto_size)
    "bn": "running",  # BatchNorm statistics outside training; "batch": the authors' code (never in eval mode)
    "proto_lr": 1e-3,
    "proto_weight_decay": 0.01,
    "backbone_lr_scale": 0.1,
    "task_block": 2,  # clax: tasks per block of the old-task passes (cost follows the tasks seen)
}
HNET_INITS = ("kaiming", "affine")
PAH_RULES = {"proto_size": POSITIVE_INT, "proto_channels": POSITIVE_INT, "init": one_of("semantic", "random"),
             "hidden": WIDTHS, "alpha": NON_NEGATIVE, "temperature": POSITIVE, "kd_direction": one_of(*DIRECTIONS),
             "hnet_init": one_of(*HNET_INITS), "proto_input": one_of(*PROTO_INPUTS), "bn": one_of(*BN_MODES),
             "proto_lr": POSITIVE, "proto_weight_decay": NON_NEGATIVE, "backbone_lr_scale": POSITIVE,
             "task_block": POSITIVE_INT}
#: one line per setting, as ``clax list pah`` prints it
PAH_HELP = {
    "proto_size": "side of each class prototype image",
    "proto_channels": "channels of each prototype image",
    "init": "prototypes from training images (semantic, the paper) or random (the ablation)",
    "hidden": "the head hypernetwork's layer widths",
    "alpha": "weight of the distillation of old tasks' heads",
    "temperature": "softmax temperature of that distillation",
    "kd_direction": "KL(student || teacher) (authors' code) or KL(teacher || student) (Hinton's)",
    "hnet_init": "hypernetwork init: Kaiming-normal (authors') or LeCun with an affine output",
    "head_bias": "also generate a bias for each head",
    "proto_input": "prototypes resized to the backbone's input (the paper) or fed at native size",
    "bn": "BatchNorm outside training: running statistics, or the batch's (authors' code)",
    "proto_lr": "learning rate of the prototype step's AdamW",
    "proto_weight_decay": "weight decay of the prototype step's AdamW",
    "backbone_lr_scale": "the backbone's learning rate as a multiple of train.lr",
    "task_block": "tasks per block of the old-task passes; blocks not yet seen are skipped",
}


def pah(ctx: Context, **settings) -> Method:
    """PAH with settings ``proto_size``, ``proto_channels``, ``init`` (semantic | random), ``hidden``
    (the hypernetwork's widths), ``alpha`` (KD weight), ``temperature``, ``kd_direction``
    (student_teacher | teacher_student), ``hnet_init`` (kaiming | affine), ``head_bias``,
    ``proto_input`` (resize | native), ``bn`` (running | batch), ``proto_lr``, ``proto_weight_decay`` (the
    prototype step's AdamW) and ``backbone_lr_scale``; see the module docstring for which choice is whose.

    Raises:
      ValueError: a scenario other than TIL, or a bad setting (the message names it and its value).
    """
    s = check_settings("pah", PAH_DEFAULTS, settings, PAH_RULES)
    if ctx.scenario != "til":
        raise ValueError(f"pah is task-incremental (it generates one head per task id); scenario "
                         f"{ctx.scenario!r} is not supported, use scenario=til")
    geom = image_geometry(ctx.input_shape)
    size, pch = s["proto_size"], s["proto_channels"]
    if pch not in (1, geom[2]):
        raise ValueError(f"pah.proto_channels must be 1 or the input's {geom[2]} channels, got {pch}")
    if s["proto_input"] == "native":
        prototype.check_native_input(ctx, size, geom)
    T, C, D = ctx.num_tasks, ctx.task_classes.shape[1], ctx.backbone.feature_dim
    table_shape = (T, C, size * size * pch)  # flat images (prototype's docstring)

    def head_init(key):
        head = init_head(key, D, C)
        return head if s["head_bias"] else {"kernel": head["kernel"]}

    # "affine": the raw output is mapped to a LeCun-initialised head's scale; "kaiming": used as it is
    lay = H.layout(head_init, key=jax.random.PRNGKey(0) if s["hnet_init"] == "affine" else None)
    emb_dim = int(np.prod(table_shape[1:]))
    hn = H.plain(lay, emb_dim, s["hidden"], use_bias=False, activation=jax.nn.leaky_relu, name="pah")
    sizes = (emb_dim, *(int(h) for h in s["hidden"]), lay.num_params)
    hnet_init = (lambda key: {"mlp": kaiming_mlp_init(key, sizes)}) if s["hnet_init"] == "kaiming" else hn.init

    render = prototype.renderer(ctx, pch, native=s["proto_input"] == "native")
    block = s["task_block"]
    net = generated_head.model(ctx, hn, prototype.random_table(table_shape), hnet_init, bn=s["bn"], name="pah",
                               block=block)
    own = generated_head.own_outputs(ctx, hn, render, bn=s["bn"])
    return chain(
        net,
        proto_distill.two_step(ctx, own, s["alpha"], s["temperature"], s["kd_direction"], s["proto_lr"],
                               s["proto_weight_decay"], block=block),
        prototype.prototypes(ctx, size, pch, s["init"]),
        lr_scale.lr_scale("shared/backbone", s["backbone_lr_scale"], name="backbone_lr"),
        name="pah")
