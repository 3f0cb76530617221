"""PAH: Prototype-Augmented Hypernetworks (De La Fuente et al., arXiv 2505.07450).

A shared, trained backbone; per task, one learnable prototype per class — a small image
(``proto_size`` x ``proto_size`` x ``proto_channels``, default 10x10x1). The task embedding is the
flattened prototypes of the task, and a small bias-free LeakyReLU hypernetwork maps it to the task's
linear head: no head is stored. Each batch takes two optimiser steps inside the one compiled step:

1. the trainer's optimizer over all of ``cl.shared`` (backbone, hypernetwork, the prototype table
   ``[T, C, s, s, ch]``) on ``CE + alpha * sum_{j<t} KD_j``, the old heads' logits on the current
   batch distilled from the teacher (the model after task ``t-1``, T = 2);
2. :func:`Method.post_update`: the prototypes only, on the same KD between the student's and the
   teacher's old-task logits on each old task's *own prototypes* (repeated to the input's channels
   and, by default, resized to its size), with its own optax state in ``cl.extra["proto_opt"]``.

``KD_j = T^2 * mean_batch KL(...)`` at temperature ``T``. Where the paper is silent clax follows the
authors' code (pah2025/PAH, ``train_hyper2d.py`` and ``networks/``) by default; each other choice is
a setting, and the defaults are the authors' (paper: alpha 0.5, T 2, 10x10x1 semantic prototypes):

* ``kd_direction``: ``"student_teacher"`` (default, the authors' ``distillation_output_loss``:
  ``T^2 * sum_c p_s log(p_s / p_t)`` with both probabilities clamped at 1e-10, mean over the batch,
  summed over old tasks) or ``"teacher_student"`` (``KL(teacher || student)``, Hinton's direction and
  clax's before issue 11).
* The hypernetwork (the authors' ``HyperNetwork_seq`` / ``FCBlock`` with ``hyper_hidden_layers=1``,
  ``hyper_hidden_features=16``): ``hidden=[16, 16]`` (their one "hidden layer" setting builds an
  input layer to 16 and one 16->16 layer, so two hidden layers), LeakyReLU (slope 0.01, PyTorch's
  default), no biases, the generated head ``logits = f @ W`` bias-free (``TaskHead_simple``).
  ``hnet_init="kaiming"`` (default, theirs): every layer Kaiming-normal (fan-in, gain sqrt(2)), the
  last one then divided by 10, and the hypernetwork's raw output *is* the head's kernel.
  ``hnet_init="affine"`` (clax before issue 11): LeCun-normal layers and the raw output mapped by the
  per-leaf affine of :func:`clax.transforms.hypernet.layout` to the scale of a LeCun-initialised head.
  ``head_bias=True`` (clax before issue 11) also generates a bias per class; ``hidden=[16]`` gives
  clax's former single hidden layer.
* ``proto_input``: ``"resize"`` (default; the paper: prototypes "repeated to the input's channels
  and resized") or ``"native"`` (the authors' code: fed at ``proto_size`` without resizing; image
  backbones that accept that size only, e.g. ResNet-18 with global pooling).
* ``bn``: ``"running"`` (default, clax) or ``"batch"`` (the authors' code, which never calls
  ``eval()``): the BatchNorm statistics of every forward pass outside the training batch's own (the
  test predictions, the teacher on the current batch, the prototype pass). With ``"batch"`` a test
  prediction depends on the other test images of its evaluation batch (clax pads the last batch with
  repeats of its own images), and the prototype pass normalises each task's ``C`` prototypes as one
  batch, as their ``pass_prototypes(task_id)`` does. clax keeps ``"running"`` as the default so that a
  prediction is a function of its image alone. Backbones without BatchNorm (the MLP on the offline
  digits) are unaffected.

Where clax differs from the authors' code without a setting: their prototype step also steps with
the gradient left over from step 1 (``opt_prototypes`` is not zeroed between the two backward
passes); clax's step 2 uses the alignment loss's gradient only, as the paper describes. Their two
AdamW optimisers keep their state across tasks; clax's trainer re-initialises the main optimizer's
state at each task (the prototype step's state carries over). Their AdamW groups pass
``"weight_decay "`` (with a trailing space, ignored), so every group decays at PyTorch's default
0.01: clax's ``train.weight_decay=0.01`` (registry) and ``proto_weight_decay=0.01`` match that,
the backbone's group included (its decay, like its rate, is ``backbone_lr_scale`` times the others':
``1e-4 * 0.01`` a step, as the authors' group with ``lr=1e-4``).

Prototype initialisation: ``semantic`` (the paper) takes one training image per class (the first of
that class in the task's training data: the stratified split is already seeded), channel-mean,
centre-cropped (or resized where the image is smaller) to the prototype size, and ``train_filter``
removes those images from the training set; ``random`` draws N(0.5, 0.1) (the ablation).

The backbone's learning rate is ``backbone_lr_scale`` times the trainer's (paper: 1e-4 vs 1e-3): a
per-partition rate, the method's ``lr_scales`` ``(("shared/backbone", backbone_lr_scale),)``, which the
trainer chains after its optimizer (:func:`clax.train.lr_scale_transform`; ``train.lr_scales`` can
override it). The state and the checkpoint hold the backbone's real weights. (Before issue 13 the
backbone was stored divided by the scale and multiplied back in the forward pass; under Adam that
gives nearly the same steps, but AdamW then decayed the real weights by ``lr * wd``, ten times the
authors', and Adam's ``eps`` acted ten times larger on the backbone.)

Old prototypes and the KD run over the whole preallocated table with a mask ``j < t``, so shapes are
fixed and a new task adds no compilation; the step time grows with ``t`` only through the work (the
old heads and the ``t * C`` prototype images), see BENCHMARKS.md. TIL only.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.methods.base import Context, Method, TaskData
from clax.partition import CLState
from clax.settings import NON_NEGATIVE, POSITIVE, POSITIVE_INT, WIDTHS, check_settings, one_of
from clax.transforms import hypernet as H
from clax.transforms.classifier import NEG, cross_entropy, init_head
from clax.transforms.distill import DIRECTIONS, kd_loss

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
}
HNET_INITS = ("kaiming", "affine")
PROTO_INPUTS = ("resize", "native")
BN_MODES = ("running", "batch")
PAH_RULES = {"proto_size": POSITIVE_INT, "proto_channels": POSITIVE_INT, "init": one_of("semantic", "random"),
             "hidden": WIDTHS, "alpha": NON_NEGATIVE, "temperature": POSITIVE, "kd_direction": one_of(*DIRECTIONS),
             "hnet_init": one_of(*HNET_INITS), "proto_input": one_of(*PROTO_INPUTS), "bn": one_of(*BN_MODES),
             "proto_lr": POSITIVE, "proto_weight_decay": NON_NEGATIVE, "backbone_lr_scale": POSITIVE}
#: the authors' KL_divergence clamps both probabilities at this value (only with kd_direction=student_teacher)
KD_EPS = 1e-10


def image_geometry(input_shape) -> tuple[int, int, int]:
    """``(H, W, C)`` of an input: images as they are, flat vectors of a square side as one channel."""
    shape = tuple(input_shape)
    if len(shape) == 3:
        return shape
    if len(shape) == 1 and int(math.isqrt(shape[0])) ** 2 == shape[0]:
        side = int(math.isqrt(shape[0]))
        return side, side, 1
    raise ValueError(f"pah needs image inputs (H, W, C) or square flat images; got input shape {shape}")


def semantic_prototype(img: np.ndarray, geom, size: int, channels: int) -> np.ndarray:
    """One image (flat or ``[H, W, C]``) -> a ``[size, size, channels]`` prototype: channel mean, then a
    centre crop to ``size`` (or a bilinear resize where the image is smaller), repeated to ``channels``."""
    h, w, c = geom
    g = np.asarray(img, np.float32).reshape(h, w, c).mean(-1)
    if h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        g = g[top:top + size, left:left + size]
    else:
        g = np.asarray(jax.image.resize(g, (size, size), "bilinear"))
    return np.repeat(g[..., None], channels, axis=-1)


def kaiming_mlp_init(key, sizes, last_divisor: float = 10.0) -> list[dict]:
    """Bias-free MLP layers ``sizes[0] -> ... -> sizes[-1]`` as the PAH authors initialise them:
    ``kaiming_normal_(mode="fan_in", nonlinearity="relu")`` (std ``sqrt(2 / fan_in)``) for every
    layer (their ``FCBlock``), the last one then divided by ``last_divisor`` (their
    ``hyper_weight_init``: ``/ 1e1``)."""
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, (a, b)) in enumerate(zip(keys, zip(sizes[:-1], sizes[1:]))):
        w = jax.random.normal(k, (a, b)) * math.sqrt(2.0 / a)
        layers.append({"kernel": w / last_divisor if i == len(sizes) - 2 else w})
    return layers


def hn_widths(hidden) -> tuple[int, ...]:
    """The hypernetwork's hidden widths as a tuple (each a positive integer, checked by
    :func:`clax.transforms.hypernet.plain`)."""
    return tuple(int(h) for h in hidden)


def _check_native_input(ctx: Context, size: int, geom) -> None:
    """``proto_input="native"`` feeds ``size x size`` images: the backbone must be an image backbone
    that accepts that size (shape-checked once with :func:`jax.eval_shape`)."""
    if len(tuple(ctx.input_shape)) != 3:
        raise ValueError(f"pah.proto_input='native' needs an image backbone; {ctx.backbone.name!r} takes flat "
                         f"inputs of shape {tuple(ctx.input_shape)}: use pah.proto_input=resize")
    try:
        jax.eval_shape(lambda key: ctx.backbone.apply(*ctx.backbone.init(key), jnp.zeros((1, size, size, geom[2])),
                                                      False), jax.random.PRNGKey(0))
    except Exception as e:  # noqa: BLE001 (any shape error of the backbone)
        raise ValueError(f"pah.proto_input='native': backbone {ctx.backbone.name!r} does not accept "
                         f"{size}x{size} prototypes ({type(e).__name__}); use pah.proto_input=resize") from e


def pah(ctx: Context, **settings) -> Method:
    """PAH with settings ``proto_size``, ``proto_channels``, ``init`` (semantic | random), ``hidden``
    (the hypernetwork's widths), ``alpha`` (KD weight), ``temperature``, ``kd_direction``
    (student_teacher | teacher_student), ``hnet_init`` (kaiming | affine), ``head_bias``,
    ``proto_input`` (resize | native), ``bn`` (running | batch), ``proto_lr``, ``proto_weight_decay`` (the prototype step's
    AdamW) and ``backbone_lr_scale``; see the module docstring for which choice is whose.

    Raises:
      ValueError: a scenario other than TIL, or a bad setting (the message names it and its value).
    """
    s = check_settings("pah", PAH_DEFAULTS, settings, PAH_RULES)
    if ctx.scenario != "til":
        raise ValueError(f"pah is task-incremental (it generates one head per task id); scenario "
                         f"{ctx.scenario!r} is not supported, use scenario=til")
    geom = image_geometry(ctx.input_shape)
    if s["proto_channels"] not in (1, geom[2]):
        raise ValueError(f"pah.proto_channels must be 1 or the input's {geom[2]} channels, got {s['proto_channels']}")
    T, C, D = ctx.num_tasks, ctx.task_classes.shape[1], ctx.backbone.feature_dim
    size, pch = s["proto_size"], s["proto_channels"]
    proto_shape = (C, size, size, pch)
    native = s["proto_input"] == "native"
    if native:
        _check_native_input(ctx, size, geom)
    proto_in = (size, size, geom[2]) if native else tuple(ctx.input_shape)

    def head_init(key):
        head = init_head(key, D, C)
        return head if s["head_bias"] else {"kernel": head["kernel"]}

    # "affine": the raw output is mapped to a LeCun-initialised head's scale; "kaiming": used as it is
    lay = H.layout(head_init, key=jax.random.PRNGKey(0) if s["hnet_init"] == "affine" else None)
    emb_dim = int(np.prod(proto_shape))
    hn = H.plain(lay, emb_dim, s["hidden"], use_bias=False, activation=jax.nn.leaky_relu, name="pah")
    hn_sizes = (emb_dim, *hn_widths(s["hidden"]), lay.num_params)
    kd_eps = KD_EPS if s["kd_direction"] == "student_teacher" else 0.0
    cmask = jnp.asarray(ctx.task_classes >= 0)
    ptx = optax.adamw(s["proto_lr"], weight_decay=s["proto_weight_decay"])

    def hnet_init(key):
        if s["hnet_init"] == "kaiming":
            return {"mlp": kaiming_mlp_init(key, hn_sizes)}
        return hn.init(key)

    def render(protos):
        """``[..., C, s, s, ch]`` prototypes -> backbone inputs ``[..., C, *proto_in]``: repeated to
        the input's channels, resized to its size unless ``proto_input="native"``."""
        lead = protos.shape[:-3]
        img = protos if native else jax.image.resize(protos, lead + (geom[0], geom[1], pch), "bilinear")
        img = jnp.broadcast_to(img, img.shape[:-1] + (geom[2],)) if pch == 1 else img
        return img.reshape(lead + proto_in)

    def heads(hparams, protos):
        """Generated heads of every task: ``{"kernel": [T, D, C]}`` (and ``"bias": [T, C]`` with
        ``head_bias``)."""
        return jax.vmap(lambda p: hn.apply(hparams, p.reshape(-1)))(protos)

    def bias(hd):
        """The heads' bias as ``[1, T, C]`` (0 for the authors' bias-free head)."""
        return hd["bias"][None] if "bias" in hd else 0.0

    def feats(model, stats, x, train):
        return ctx.backbone.apply(model["backbone"], stats, x, train)

    def feats_eval(model, stats, x):
        """Features outside the training batch's own pass: running statistics (``bn="running"``) or
        ``x``'s own batch statistics (``bn="batch"``, the authors' code); the statistics are not updated."""
        return feats(model, stats, x, s["bn"] == "batch")[0]

    def init(key):
        kb, kh, kp = jax.random.split(key, 3)
        params, stats = ctx.backbone.init(kb)
        protos = 0.5 + 0.1 * jax.random.normal(kp, (T,) + proto_shape)
        shared = {"backbone": params, "hnet": hnet_init(kh), "protos": protos}
        return CLState(frozen={}, shared=shared, per_task={}, state={"backbone": stats},
                       extra={"teacher": {**shared, "stats": stats}, "proto_opt": ptx.init(protos)})

    def old_logits(model, stats, x):
        """``[B, T, C]``: every task's generated head on the features of ``x`` (see ``bn``)."""
        f = feats_eval(model, stats, x)
        hd = heads(model["hnet"], model["protos"])
        return jnp.einsum("bd,tdc->btc", f, hd["kernel"]) + bias(hd)

    def loss(cl, batch, key, t):
        f, stats = feats(cl.shared, cl.state["backbone"], batch["x"], True)
        hd = heads(cl.shared["hnet"], cl.shared["protos"])                      # every task's head
        s_all = jnp.einsum("bd,tdc->btc", f, hd["kernel"]) + bias(hd)  # [B, T, C]
        logits = jnp.where(cmask[t], s_all[:, t], NEG)
        ce = cross_entropy(logits, batch["y"])
        teacher = cl.extra["teacher"]
        t_all = jax.lax.stop_gradient(old_logits(teacher, teacher["stats"], batch["x"]))
        kd = _old_task_kd(s_all, t_all, t)
        total = ce + s["alpha"] * kd
        return total, ({**cl.state, "backbone": stats}, {"loss": total, "ce": ce, "kd": kd})

    def _old_task_kd(s_all, t_all, t):
        """``sum_{j<t}`` KD between student and teacher logits ``[B, T, C]`` of task ``j``."""
        per = jax.vmap(lambda sj, tj, m: kd_loss(sj, tj, s["temperature"], m[None], s["kd_direction"], kd_eps),
                       in_axes=(1, 1, 0))(s_all, t_all, cmask)
        return jnp.sum(jnp.where(jnp.arange(T) < t, per, 0.0))

    def own_logits(model, stats, protos):
        """``[C, T, C]``: task ``j``'s generated head on its own prototypes (entry ``[c, j]``)."""
        x = render(protos)                                                     # [T, C, *proto_in]
        if s["bn"] == "batch":  # each task's C prototypes are one batch (the authors' pass_prototypes)
            f = jax.vmap(lambda xj: feats_eval(model, stats, xj))(x)
        else:
            f = feats_eval(model, stats, x.reshape((T * C,) + proto_in)).reshape(T, C, -1)
        hd = heads(model["hnet"], protos)
        return jnp.einsum("jcd,jdk->cjk", f, hd["kernel"]) + bias(hd)

    def post_update(cl, batch, key, t):
        teacher = cl.extra["teacher"]
        t_own = jax.lax.stop_gradient(own_logits(teacher, teacher["stats"], teacher["protos"]))
        model = jax.lax.stop_gradient(cl.shared)

        def proto_loss(protos):
            s_own = own_logits({**model, "protos": protos}, cl.state["backbone"], protos)
            return _old_task_kd(s_own, t_own, t)

        g = jax.grad(proto_loss)(cl.shared["protos"])
        upd, opt = ptx.update(g, cl.extra["proto_opt"], cl.shared["protos"])
        protos = optax.apply_updates(cl.shared["protos"], upd)
        protos = jnp.where((jnp.arange(T) < t)[:, None, None, None, None], protos, cl.shared["protos"])
        return cl.replace(shared={**cl.shared, "protos": protos}, extra={**cl.extra, "proto_opt": opt})

    def picks(data: TaskData) -> np.ndarray:
        """Index of the first training image of each of the task's classes (targets 0..C-1)."""
        y = np.asarray(data.y)
        return np.asarray([int(np.flatnonzero(y == c)[0]) for c in range(C) if np.any(y == c)], np.int64)

    def begin_task(cl, data: TaskData):
        t = data.t
        teacher = jax.tree.map(jnp.array, {**cl.shared, "stats": cl.state["backbone"]})
        protos = cl.shared["protos"]
        if s["init"] == "semantic":
            idx = picks(data)
            x = np.asarray(data.x[idx])
            init_p = np.stack([semantic_prototype(img, geom, size, pch) for img in x])
            protos = protos.at[t, :len(idx)].set(jnp.asarray(init_p))
        return cl.replace(shared={**cl.shared, "protos": protos}, extra={**cl.extra, "teacher": teacher})

    def train_filter(data: TaskData) -> np.ndarray:
        keep = np.ones(len(data.y), bool)
        keep[picks(data)] = False
        return np.flatnonzero(keep)

    def predict(cl, x, tid):
        f = feats_eval(cl.shared, cl.state["backbone"], x)
        hd = heads(cl.shared["hnet"], cl.shared["protos"])
        out = jnp.einsum("bd,bdc->bc", f, hd["kernel"][tid])
        out = out + hd["bias"][tid] if "bias" in hd else out
        return jnp.where(cmask[tid], out, NEG)

    def task_bytes(cl, t):
        return int(np.prod(proto_shape)) * 4  # the task's prototypes (its head is generated)

    return Method("pah", init, loss, predict, begin_task=begin_task, post_update=post_update,
                  task_bytes=task_bytes, train_filter=train_filter if s["init"] == "semantic" else None,
                  lr_scales=(("shared/backbone", float(s["backbone_lr_scale"])),))
