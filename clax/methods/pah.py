"""PAH: Prototype-Augmented Hypernetworks (De La Fuente et al., arXiv 2505.07450).

A shared, trained backbone; per task, one learnable prototype per class — a small image
(``proto_size`` x ``proto_size`` x ``proto_channels``, default 10x10x1). The task embedding is the
flattened prototypes of the task, and a small bias-free LeakyReLU hypernetwork
(:func:`clax.transforms.hypernet.plain`, hidden 16) maps it to the task's linear head: no head is
stored. Each batch takes two optimiser steps inside the one compiled step:

1. the trainer's optimizer over all of ``cl.shared`` (backbone, hypernetwork, the prototype table
   ``[T, C, s, s, ch]``) on ``CE + alpha * sum_{j<t} T^2 KL(teacher_j || student_j)``, the old heads'
   logits on the current batch distilled from the teacher (the model after task ``t-1``, T = 2);
2. :func:`Method.post_update`: the prototypes only, on the same KD between the student's and the
   teacher's old-task logits on each old task's *own prototypes* (rendered to the input's shape:
   resized bilinearly and repeated to its channels), with its own optax state in
   ``cl.extra["proto_opt"]``.

Prototype initialisation: ``semantic`` (the paper) takes one training image per class (the first of
that class in the task's training data: the stratified split is already seeded), channel-mean,
centre-cropped (or resized where the image is smaller) to the prototype size, and ``train_filter``
removes those images from the training set; ``random`` draws N(0.5, 0.1) (the ablation).

The backbone's learning rate is ``backbone_lr_scale`` times the trainer's (paper: 1e-4 vs 1e-3):
the backbone is stored divided by that factor and multiplied back in the forward pass, which under
Adam(W) (invariant to gradient scale) moves the real weights by exactly that fraction. The
checkpoint therefore holds ``shared/backbone`` divided by ``backbone_lr_scale``.

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
from clax.transforms import hypernet as H
from clax.transforms.classifier import NEG, cross_entropy, head_logits, init_head
from clax.transforms.distill import kd_loss

PAH_DEFAULTS = {
    "proto_size": 10,
    "proto_channels": 1,
    "init": "semantic",
    "hidden": [16],
    "alpha": 2.0,  # the paper's 0.5 (experiments/pah_*.py) forgets more than finetune on 2-class digits tasks
    "temperature": 2.0,
    "proto_lr": 1e-3,
    "proto_weight_decay": 0.01,
    "backbone_lr_scale": 0.1,
}


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


def pah(ctx: Context, **settings) -> Method:
    """PAH with settings ``proto_size``, ``proto_channels``, ``init`` (semantic | random), ``hidden``
    (the hypernetwork's widths), ``alpha`` (KD weight), ``temperature``, ``proto_lr``,
    ``proto_weight_decay`` (the prototype step's AdamW) and ``backbone_lr_scale``."""
    s = {**PAH_DEFAULTS, **settings}
    if ctx.scenario != "til":
        raise ValueError(f"pah is task-incremental (it generates one head per task id); scenario "
                         f"{ctx.scenario!r} is not supported, use scenario=til")
    for k in ("proto_size", "proto_channels"):
        if not isinstance(s[k], int) or s[k] <= 0:
            raise ValueError(f"pah.{k} must be a positive integer, got {s[k]!r}")
    if s["init"] not in ("semantic", "random"):
        raise ValueError(f"pah.init must be 'semantic' or 'random', got {s['init']!r}")
    if not s["backbone_lr_scale"] > 0:
        raise ValueError(f"pah.backbone_lr_scale must be > 0, got {s['backbone_lr_scale']}")
    geom = image_geometry(ctx.input_shape)
    if s["proto_channels"] not in (1, geom[2]):
        raise ValueError(f"pah.proto_channels must be 1 or the input's {geom[2]} channels, got {s['proto_channels']}")
    T, C, D = ctx.num_tasks, ctx.task_classes.shape[1], ctx.backbone.feature_dim
    size, pch, k = s["proto_size"], s["proto_channels"], float(s["backbone_lr_scale"])
    proto_shape = (C, size, size, pch)
    lay = H.layout(lambda key: init_head(key, D, C), key=jax.random.PRNGKey(0))
    hn = H.plain(lay, int(np.prod(proto_shape)), s["hidden"], use_bias=False, activation=jax.nn.leaky_relu,
                 name="pah")
    cmask = jnp.asarray(ctx.task_classes >= 0)
    ptx = optax.adamw(s["proto_lr"], weight_decay=s["proto_weight_decay"])

    def render(protos):
        """``[..., C, s, s, ch]`` prototypes -> backbone inputs ``[..., C, *input_shape]``."""
        lead = protos.shape[:-3]
        img = jax.image.resize(protos, lead + (geom[0], geom[1], pch), "bilinear")
        img = jnp.broadcast_to(img, lead + (geom[0], geom[1], geom[2])) if pch == 1 else img
        return img.reshape(lead + tuple(ctx.input_shape))

    def heads(hparams, protos):
        """Generated heads of every task: ``{"kernel": [T, D, C], "bias": [T, C]}``."""
        return jax.vmap(lambda p: hn.apply(hparams, p.reshape(-1)))(protos)

    def feats(model, stats, x, train):
        return ctx.backbone.apply(jax.tree.map(lambda u: k * u, model["backbone"]), stats, x, train)

    def init(key):
        kb, kh, kp = jax.random.split(key, 3)
        params, stats = ctx.backbone.init(kb)
        protos = 0.5 + 0.1 * jax.random.normal(kp, (T,) + proto_shape)
        shared = {"backbone": jax.tree.map(lambda p: p / k, params), "hnet": hn.init(kh), "protos": protos}
        return CLState(frozen={}, shared=shared, per_task={}, state={"backbone": stats},
                       extra={"teacher": {**shared, "stats": stats}, "proto_opt": ptx.init(protos)})

    def old_logits(model, stats, x):
        """``[B, T, C]``: every task's generated head on the features of ``x`` (eval mode)."""
        f, _ = feats(model, stats, x, False)
        hd = heads(model["hnet"], model["protos"])
        return jnp.einsum("bd,tdc->btc", f, hd["kernel"]) + hd["bias"][None]

    def loss(cl, batch, key, t):
        f, stats = feats(cl.shared, cl.state["backbone"], batch["x"], True)
        hd = heads(cl.shared["hnet"], cl.shared["protos"])                      # every task's head
        s_all = jnp.einsum("bd,tdc->btc", f, hd["kernel"]) + hd["bias"][None]    # [B, T, C]
        logits = jnp.where(cmask[t], s_all[:, t], NEG)
        ce = cross_entropy(logits, batch["y"])
        teacher = cl.extra["teacher"]
        t_all = jax.lax.stop_gradient(old_logits(teacher, teacher["stats"], batch["x"]))
        kd = _old_task_kd(s_all, t_all, t)
        total = ce + s["alpha"] * kd
        return total, ({**cl.state, "backbone": stats}, {"loss": total, "ce": ce, "kd": kd})

    def _old_task_kd(s_all, t_all, t):
        """``sum_{j<t}`` KD between student and teacher logits ``[B, T, C]`` of task ``j``."""
        per = jax.vmap(lambda sj, tj, m: kd_loss(sj, tj, s["temperature"], m[None]), in_axes=(1, 1, 0))(
            s_all, t_all, cmask)
        return jnp.sum(jnp.where(jnp.arange(T) < t, per, 0.0))

    def own_logits(model, stats, protos):
        """``[C, T, C]``: task ``j``'s generated head on its own prototypes (entry ``[c, j]``)."""
        x = render(protos).reshape((T * C,) + tuple(ctx.input_shape))
        f, _ = feats(model, stats, x, False)
        hd = heads(model["hnet"], protos)
        return jnp.einsum("jcd,jdk->cjk", f.reshape(T, C, -1), hd["kernel"]) + hd["bias"][None]

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
        f, _ = feats(cl.shared, cl.state["backbone"], x, False)
        hd = heads(cl.shared["hnet"], cl.shared["protos"])
        out = head_logits(hd, f, tid)
        return jnp.where(cmask[tid], out, NEG)

    def task_bytes(cl, t):
        return int(np.prod(proto_shape)) * 4  # the task's prototypes (its head is generated)

    return Method("pah", init, loss, predict, begin_task=begin_task, post_update=post_update,
                  task_bytes=task_bytes, train_filter=train_filter if s["init"] == "semantic" else None)
