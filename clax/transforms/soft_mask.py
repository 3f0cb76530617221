"""Per-task real-valued multiplicative masks on selected weights (Soft-TF, Kang & Yoo 2024).

A filter (a regular expression searched in ``/``-joined parameter paths, as in
:func:`clax.partition.split`) selects weights ``W``; task ``t`` owns a mask ``M_t`` of ``W``'s full shape
and the backbone runs with ``W_t = M_t * W``. Masks start uniform in ``[0.99, 1.0]`` so that a fresh
task starts from the pretrained solution. Masks are stored under ``"."``-joined paths (checkpoint-safe
keys) with a leading task axis ``[T, *W.shape]``.

Stored precision: :func:`quantize` rounds a mask to the precision it is stored in (``float32``,
``float16``, ``bfloat16`` or ``int8`` with a per-tensor affine range) and back, so that a model can be
evaluated exactly as it is stored; :func:`stored_nbytes` gives the bytes.

Soft-TF's pieces: :func:`model`, the frozen ViT under task ``t``'s masks (and DualPrompt prefixes) with
per-task heads; :func:`stored`, the transform that replaces each task's mask row by its stored value at
the task's end and counts its stored bytes; :func:`block_filter` (the last ``n`` blocks) and
:func:`layer_filter` (named blocks), the masked blocks' filters.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from clax import partition as P
from clax.compose import Model, Transform
from clax.partition import CLState
from clax.transforms import binary_mask, classifier, prompt
from clax.transforms.frozen import by_task, train_rows

PyTree = Any
PRECISIONS = ("float32", "float16", "bfloat16", "int8")


def select(params: PyTree, filter: str) -> dict[str, tuple]:
    """The leaves of ``params`` whose ``/``-joined path matches the regex ``filter``: ``{key: path}``.

    Raises:
      ValueError: the filter matches no parameter, or is not a valid regular expression (the message
        names the filter).
    """
    try:
        pattern = re.compile(filter)
    except re.error as e:
        raise ValueError(f"mask filter {filter!r} is not a valid regular expression: {e}") from None
    flat = flatten_dict(params)
    hits = {".".join(map(str, k)): k for k in flat if pattern.search("/".join(map(str, k)))}
    if not hits:
        some = ", ".join("/".join(map(str, k)) for k in list(flat)[:6])
        raise ValueError(f"mask filter {filter!r} matches no parameter (paths look like: {some}, ...)")
    return hits


def init(key: jax.Array, params: PyTree, filter: str, num_tasks: int, low: float = 0.99,
         high: float = 1.0) -> dict[str, jax.Array]:
    """Masks ``{key: [T, *W.shape]}``, uniform in ``[low, high]``, for the weights ``filter`` selects."""
    flat = flatten_dict(params)
    sel = select(params, filter)
    keys = jax.random.split(key, len(sel))
    return {k: jax.random.uniform(kk, (num_tasks,) + flat[p].shape, jnp.float32, low, high)
            for kk, (k, p) in zip(keys, sorted(sel.items()))}


def apply(params: PyTree, masks: dict[str, jax.Array]) -> PyTree:
    """``params`` with each masked weight multiplied by its mask (one task's row, ``W.shape``)."""
    flat = dict(flatten_dict(params))
    for k, m in masks.items():
        p = tuple(k.split("."))
        flat[p] = flat[p] * m.astype(flat[p].dtype)
    return unflatten_dict(flat)


def row(masks: dict[str, jax.Array], t) -> dict[str, jax.Array]:
    """Task ``t``'s masks (``t`` a Python or traced int)."""
    return {k: m[t] for k, m in masks.items()}


def superimpose(masks: dict[str, jax.Array], alpha: jax.Array) -> dict[str, jax.Array]:
    """``sum_t alpha[t] * M_t`` for every mask: the superposition used by one-shot task inference."""
    return {k: jnp.tensordot(alpha, m, axes=1) for k, m in masks.items()}


def quantize(mask, precision: str, batch_dims: int = 0) -> np.ndarray:
    """``mask`` rounded to ``precision`` and back to float32 (what a stored mask evaluates as), on the host.

    ``int8`` is 256 levels evenly spaced over the tensor's ``[min, max]`` (two float32 stored beside);
    with ``batch_dims=1`` each slice ``mask[i]`` is a tensor of its own (every task's row at once).

    Computed in numpy one correctly rounded float32 operation at a time: what JAX's eager dispatch of
    the same formula gives on one tensor, bit for bit (tested), without compiling every operation for
    every mask shape. (A compiled version fuses the rounding arithmetic, and XLA's CPU division of a
    vector by 255 is not correctly rounded: both differ in the last bit.)
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown mask precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    m = np.asarray(mask)
    if precision == "float32":
        return m.astype(np.float32)
    if precision == "int8":
        m = m.astype(np.float32)
        axes = tuple(range(batch_dims, m.ndim))
        lo, hi = m.min(axes, keepdims=True), m.max(axes, keepdims=True)
        step = np.where(hi > lo, (hi - lo) / np.float32(255.0), np.float32(1.0))
        return lo + np.round((m - lo) / step) * step
    return m.astype(jnp.dtype(precision)).astype(np.float32)


def stored_nbytes(shape, precision: str) -> int:
    """Bytes a mask of ``shape`` occupies stored at ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown mask precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    n = int(np.prod(shape))
    return n + 8 if precision == "int8" else n * jnp.dtype(precision).itemsize


def vit_depth(params) -> int:
    """The number of ViT blocks (``blocks_0``, ``blocks_1``, ...) in ``params``."""
    return sum(1 for k in params if str(k).startswith("blocks_"))


def _blocks_regex(ids) -> str:
    return rf"^blocks_({'|'.join(str(i) for i in ids)})/(attn/(qkv|proj)|mlp/(fc1|fc2))/kernel$"


def block_filter(params, n: int) -> str:
    """The regex selecting qkv, proj, fc1 and fc2 kernels of the last ``n`` ViT blocks of ``params``
    (Soft-TF's ``masked_blocks``)."""
    depth = vit_depth(params)
    if depth == 0:
        raise ValueError("soft_tf.masked_blocks needs a ViT backbone (parameters blocks_0, blocks_1, ...); "
                         "set soft_tf.mask_filter for other backbones")
    if not 1 <= n <= depth:
        raise ValueError(f"soft_tf.masked_blocks must be in 1..{depth} (the backbone's blocks), got {n}")
    return _blocks_regex(range(depth - n, depth))


def layer_filter(params, layers, name: str = "soft_tf.masked_layers") -> str:
    """The regex selecting qkv, proj, fc1 and fc2 kernels of the ViT blocks ``layers`` of ``params``
    (block indices, negative ones counting from the last block; Soft-TF's ``masked_layers``, e.g. the
    authors' runnable configs' ``[11]`` for CIFAR-100 and ``[5]`` for ImageNet-R).

    Raises:
      ValueError: no ViT blocks, or a layer outside them or repeated (naming the setting ``name``).
    """
    depth = vit_depth(params)
    if depth == 0:
        raise ValueError(f"{name} needs a ViT backbone (parameters blocks_0, blocks_1, ...); "
                         "set soft_tf.mask_filter for other backbones")
    return _blocks_regex(sorted(prompt.resolve_layers(name, layers, depth)))


def model(ctx, params: PyTree, stats: PyTree, filter: str, binary: bool = False, keep=None,
          label_smoothing: float = 0.0, prompts=None, name: str = "soft_tf"):
    """Soft-TF's network: ``(Model, superposed)``.

    The frozen ViT ``params`` (``frozen["backbone"]``, all of it) runs task ``t`` with ``W_t = M_t * W``
    for the weights ``filter`` selects (:func:`init`; ``binary``: scores ``|W| * U(0.99, 1)`` whose top
    ``keep`` fraction is kept with a straight-through gradient) and, with ``prompts = (g_layers, e_layers,
    length[, g_length])``, DualPrompt prefixes (:mod:`clax.transforms.prompt`: G-prompts ``shared["g_prompt"]``,
    task ``t``'s E-prompt ``per_task["e_prompt"]`` and key ``per_task["e_key"]``); then task ``t``'s head
    (``per_task["head"]``), other tasks' outputs masked. ``ce`` is cross-entropy with ``label_smoothing``
    over the task's classes. A training batch's rows of other tasks (rehearsal) are scored under their own
    task, without gradient (:func:`clax.transforms.frozen.train_rows`).

    ``superposed(cl, x, alpha) -> [B, K]``: the logits of every task's stored masks, E-prompts and heads
    superimposed with weights ``alpha [T]`` (SupSup's one-shot task inference).
    """
    T, C, dim = ctx.num_tasks, ctx.num_outputs, ctx.backbone.feature_dim
    out_mask = ctx.output_mask()
    g_layers, e_layers, length, *g_length = prompts or ((), (), 0)

    def init_state(key):
        km, kh = jax.random.split(key)
        masks = init(km, params, filter, T)
        if binary:  # scores: |W| * U(0.99, 1), so the first kept set is the largest weights
            flat = flatten_dict(params)
            masks = {k: masks[k] * jnp.abs(flat[p]) for k, p in select(params, filter).items()}
        head = jax.vmap(lambda k: classifier.init_head(k, dim, C))(jax.random.split(kh, T))
        shared, per_task = {}, {"mask": masks, "head": head}
        if prompts:
            pr = prompt.init(jax.random.fold_in(key, 1), T, dim, length, g_layers, e_layers, *g_length)
            per_task.update(e_prompt=pr["e"], e_key=pr["key"])
            if g_layers:
                shared["g_prompt"] = pr["g"]
        return CLState(frozen={"backbone": params}, shared=shared, per_task=per_task,
                       state={"backbone": stats}, extra={})

    def features(cl, masks_row, x, e_row=None):
        """CLS features ``[B, dim]`` under one task's masks and (with prompts) E-prompts ``e_row``."""
        kw = {"prompts": prompt.prefixes(cl.shared.get("g_prompt"), e_row, g_layers, e_layers)} if prompts else {}
        return ctx.backbone.apply(apply(cl.frozen["backbone"], masks_row), cl.state["backbone"], x, False, **kw)[0]

    def run(cl, x, t, train=False):
        """Task ``t``'s logits ``[B, C]`` (t a scalar), other tasks' outputs masked."""
        pt = cl.per_task
        m = row(pt["mask"], t)
        m = {k: binary_mask.top_fraction_ste(v, keep) for k, v in m.items()} if binary else m
        f = features(cl, m, x, pt["e_prompt"][t] if prompts else None)
        logits = f @ pt["head"]["kernel"][t] + pt["head"]["bias"][t]
        return jnp.where(out_mask[t], logits, classifier.NEG), cl.state

    def forward(cl, x, tid, t, train, key):
        logits, state = train_rows(run, cl, x, tid, t, T) if train else (predict(cl, x, tid), cl.state)
        return logits, {}, state

    def predict(cl, x, tid):
        if tid is None:
            raise ValueError(f"method {name!r} in TIL needs task ids")
        return by_task(lambda t: run(cl, x, t)[0], tid, T)

    def ce(logits, y, tid, t):
        valid = out_mask[tid].astype(jnp.float32)
        target = (1 - label_smoothing) * jax.nn.one_hot(y, C) + label_smoothing * valid / jnp.sum(
            valid, -1, keepdims=True)
        return optax.softmax_cross_entropy(logits, target)

    def superposed(cl, x, alpha):
        pt = cl.per_task
        hard = jax.vmap(lambda m: {k: binary_mask.top_fraction(v, keep) for k, v in m.items()})(pt["mask"]) \
            if binary else pt["mask"]
        e = jnp.tensordot(alpha, pt["e_prompt"], axes=1) if prompts else None
        f = features(cl, superimpose(hard, alpha), x, e)
        cols = out_mask.astype(jnp.float32)                                        # [T, C]
        w = jnp.einsum("t,tdc,tc->dc", alpha, pt["head"]["kernel"], cols)
        b = jnp.einsum("t,tc,tc->c", alpha, pt["head"]["bias"], cols)
        return f @ w + b

    return Model(name, init_state, forward, predict, ce=ce, scalar_tid=True), superposed


def stored(precision: str, binary: bool = False, keep=None, name: str = "stored_masks") -> Transform:
    """Soft-TF's stored masks: at the end of task ``t`` its mask row is replaced by what is stored (the
    mask rounded to ``precision``, or with ``binary`` the hard top-``keep`` mask), so evaluation always
    uses the stored model; ``task_bytes``: masks at ``precision`` (binary: bit-packed) instead of float32.

    Reports ``masked`` (the masked weights) and, when not ``binary``, ``accuracy_by_mask_precision``: the
    final accuracy over every task's test set with the masks rounded to each precision, by the trainer's
    compiled eval step (so the entry of ``precision`` itself is the last row of the accuracy matrix,
    weighted by the test sets' sizes; the others are meaningful on a run with ``precision="float32"``).
    """
    def end_task(cl, data):
        t, masks = data.t, cl.per_task["mask"]
        r = row(masks, t)
        keepv = {k: binary_mask.top_fraction(v, keep) if binary else quantize(v, precision) for k, v in r.items()}
        new = {}
        for k, v in keepv.items():  # on the host: the trainer places the state again after end_task
            new[k] = np.array(masks[k])
            new[k][t] = np.asarray(v)
        return cl.replace(per_task={**cl.per_task, "mask": new})

    def task_bytes(cl, t):
        # The trainer counts the per-task row at float32; masks are stored at mask_precision
        # (binary: one bit per weight), so this is the (negative) difference.
        masks = cl.per_task["mask"]
        n = sum(binary_mask.packed_nbytes(m.shape[1:]) if binary else stored_nbytes(m.shape[1:], precision)
                for m in masks.values())
        return n - P.nbytes(P.task_row(masks, 0))

    def test_report(cl, bench, accuracy):
        # the trainer's eval step, already compiled for this state's shapes: no program of its own
        n = [len(t.y_test) for t in bench.tasks]
        acc = {}
        for prec in PRECISIONS:
            q = cl.replace(per_task={**cl.per_task, "mask": {
                k: quantize(v, prec, batch_dims=1) for k, v in cl.per_task["mask"].items()}})
            right = sum(round(accuracy(q, c) * n_c) for c, n_c in enumerate(n))  # each task's count
            acc[prec] = right / sum(n)
        return {"accuracy_by_mask_precision": acc}

    return Transform(name, end_task=end_task, task_bytes=task_bytes,
                     report=lambda cl: {"masked": sorted(cl.per_task["mask"])},
                     test_report=None if binary else test_report)
