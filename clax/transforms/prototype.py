"""Learnable class prototypes as a task embedding (PAH, De La Fuente et al. 2025).

Each task has one prototype per class, a small image ``[s, s, ch]`` (PAH: 10x10x1), stored
flattened (row-major) in the table ``cl.shared["protos"] [T, C, s * s * ch]``, which
:mod:`clax.transforms.generated_head` feeds to its hypernetwork (the flattened prototypes of a task
are its embedding). Flat, because XLA's CPU loops run over the minor dimension: an optimizer's update
of a ``[T, C, 10, 10, 1]`` table took about 4x that of the same numbers as ``[T, C, 100]``
(``benchmarks/pah_step.py``); :func:`as_images` gives the images back (``clax inspect`` and
``clax plot`` draw them). This module holds the pieces that treat the prototypes as images:

* :func:`prototypes`, the transform: ``semantic`` initialisation (the paper) at ``begin_task`` takes
  one training image per class (the first of that class in the task's training data: the stratified
  split is already seeded), channel-mean, centre-cropped (or resized where the image is smaller) to
  the prototype size, and ``train_filter`` removes those images from the training set; ``random``
  (the ablation) keeps the table's N(0.5, 0.1) draw (:func:`random_table`). ``task_bytes``: the
  task's prototypes are all it stores (its head is generated).
* :func:`renderer`: prototypes as backbone inputs, repeated to the input's channels and, with
  ``proto_input="resize"`` (the paper: "repeated to the input's channels and resized"), resized to
  its size; ``"native"`` (the authors' code) feeds them at ``s x s``, for image backbones that accept
  that size only (e.g. ResNet-18 with global pooling; :func:`check_native_input`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clax.compose import Transform
from clax.methods.base import TaskData

PROTO_INPUTS = ("resize", "native")


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


def image_shape(size: int) -> tuple[int, int] | None:
    """``(s, ch)`` of a flattened ``s x s x ch`` prototype of ``size`` numbers, ``ch`` 1 or 3: ``size``
    a square is one channel, three times a square three channels (never both: ``3 k^2 = m^2`` has no
    solution in positive integers); None otherwise."""
    for ch in (1, 3):
        if size % ch == 0:
            s = math.isqrt(size // ch)
            if s > 0 and s * s * ch == size:
                return s, ch
    return None


def as_images(protos, channels: int | None = None):
    """Prototypes ``[..., C, s * s * ch]`` (the table's layout) -> images ``[..., C, s, s, ch]``; ``ch`` is
    ``channels`` where given, else found by :func:`image_shape`. Arrays of rank >= 4 are taken as images
    already (a table saved before the flat layout) and returned as they are.

    Raises:
      ValueError: the last axis is no ``s x s x ch`` image.
    """
    if protos.ndim >= 4:
        return protos
    size = protos.shape[-1]
    if channels is None:
        geom = image_shape(size)
    else:
        s = math.isqrt(size // channels)
        geom = (s, channels) if s * s * channels == size else None
    if geom is None:
        raise ValueError(f"prototypes of {size} numbers each are no square s x s x "
                         f"{channels if channels else '1 or 3'} images (table shape {tuple(protos.shape)})")
    s, ch = geom
    return protos.reshape(tuple(protos.shape[:-1]) + (s, s, ch))


def random_table(shape) -> Callable:
    """``key -> 0.5 + 0.1 * N(0, 1)`` of ``shape``: the table's initial value (kept by ``init="random"``)."""
    return lambda key: 0.5 + 0.1 * jax.random.normal(key, tuple(shape))


def check_native_input(ctx, size: int, geom, setting: str = "pah.proto_input") -> None:
    """``proto_input="native"`` feeds ``size x size`` images: the backbone must be an image backbone
    that accepts that size (shape-checked once with :func:`jax.eval_shape`).

    Raises:
      ValueError: flat inputs, or a backbone that fails on the prototypes' shape, naming ``setting``.
    """
    if len(tuple(ctx.input_shape)) != 3:
        raise ValueError(f"{setting}='native' needs an image backbone; {ctx.backbone.name!r} takes flat "
                         f"inputs of shape {tuple(ctx.input_shape)}: use {setting}=resize")
    try:
        jax.eval_shape(lambda key: ctx.backbone.apply(*ctx.backbone.init(key), jnp.zeros((1, size, size, geom[2])),
                                                      False), jax.random.PRNGKey(0))
    except Exception as e:  # noqa: BLE001 (any shape error of the backbone)
        raise ValueError(f"{setting}='native': backbone {ctx.backbone.name!r} does not accept "
                         f"{size}x{size} prototypes ({type(e).__name__}); use {setting}=resize") from e


def renderer(ctx, channels: int, native: bool = False):
    """``protos [..., C, s * s * channels] -> [..., C, *input]``: prototypes as backbone inputs, repeated
    to the input's channels, resized to its size unless ``native`` (then ``[..., C, s, s, input
    channels]``)."""
    geom = image_geometry(ctx.input_shape)

    def render(protos):
        protos = as_images(protos, channels)
        lead, size = protos.shape[:-3], protos.shape[-3]
        proto_in = (size, size, geom[2]) if native else tuple(ctx.input_shape)
        img = protos if native else jax.image.resize(protos, lead + (geom[0], geom[1], channels), "bilinear")
        img = jnp.broadcast_to(img, img.shape[:-1] + (geom[2],)) if channels == 1 else img
        return img.reshape(lead + proto_in)

    return render


def prototypes(ctx, size: int, channels: int, init: str = "semantic", table: str = "protos",
               name: str = "prototypes") -> Transform:
    """The prototypes' semantic initialisation, training-set filter and per-task bytes (module docstring).

    With ``init="semantic"``, ``begin_task`` sets task ``t``'s row of ``cl.shared[table]`` from one
    training image per class and ``train_filter`` drops those images; ``init="random"`` keeps the
    table's initial draw and trains on every image.
    """
    geom = image_geometry(ctx.input_shape)
    C = ctx.task_classes.shape[1]

    def picks(data: TaskData) -> np.ndarray:
        """Index of the first training image of each of the task's classes (targets 0..C-1)."""
        y = np.asarray(data.y)
        return np.asarray([int(np.flatnonzero(y == c)[0]) for c in range(C) if np.any(y == c)], np.int64)

    def begin_task(cl, data: TaskData):
        idx = picks(data)
        init_p = np.stack([semantic_prototype(img, geom, size, channels) for img in np.asarray(data.x[idx])])
        protos = cl.shared[table].at[data.t, :len(idx)].set(jnp.asarray(init_p).reshape(len(idx), -1))
        return cl.replace(shared={**cl.shared, table: protos})

    def train_filter(data: TaskData) -> np.ndarray:
        keep = np.ones(len(data.y), bool)
        keep[picks(data)] = False
        return np.flatnonzero(keep)

    def task_bytes(cl, t):
        return C * size * size * channels * 4  # float32

    semantic = init == "semantic"
    return Transform(name, begin_task=begin_task if semantic else None,
                     train_filter=train_filter if semantic else None, task_bytes=task_bytes, scenarios=("til",))
