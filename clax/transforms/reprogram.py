"""Channel-wise reprogramming of a frozen CNN (CLR, Ge et al. ICCV 2023) and per-task BatchNorm.

Both are transforms of a backbone's apply function: they run it unchanged inside
``flax.linen.intercept_methods`` and catch the calls of its ``nn.Conv`` and ``nn.BatchNorm``
modules, keyed by module path (``"resnet.layer1_0.conv1"``), so they work on any Flax backbone
without editing it.

* :func:`reprogrammed`: after each frozen convolution with a kernel larger than 1x1 (every
  convolution with ``full=True``, "CLR-full"), a depthwise ``k x k`` convolution (one filter per
  channel, no bias, SAME padding) transforms the output: ``out = dwconv_t(conv_frozen(x))``.
  Kernels start as the identity (a dirac: 1 at the centre), so a fresh task sees the backbone's
  own features.
* :func:`task_batchnorm`: every BatchNorm uses task ``t``'s own scale, bias and running statistics;
  in training it normalises with the batch's statistics and returns task ``t``'s updated running
  statistics (the same update rule as ``nn.BatchNorm``).

Per-task leaves carry a leading task axis ``[T, ...]``. A task id is either a scalar (the whole batch
belongs to one task: the fast path) or ``[B]`` (one per sample).

:func:`model` is CLR's network as a :class:`clax.compose.Model` (the frozen backbone, both wrappers and
per-task heads); :func:`statistics` is the transform that counts each task's BatchNorm statistics as
stored bytes.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from clax import partition as P
from clax.compose import Model, Transform
from clax.partition import CLState
from clax.transforms import classifier
from clax.transforms.frozen import by_task, train_rows

PyTree = Any


def _key(path) -> str:
    return ".".join(map(str, path))


def conv_paths(params: PyTree, full: bool = False) -> dict[str, tuple[int, int, int]]:
    """The convolutions that reprogramming wraps: ``{path: (kh, kw, out_channels)}``.

    A convolution is a ``kernel`` leaf of rank 4 (``[kh, kw, in, out]``); it is wrapped when
    ``kh * kw > 1``, or always when ``full``.
    """
    out = {}
    for k, v in flatten_dict(params).items():
        if k[-1] == "kernel" and v.ndim == 4 and (full or v.shape[0] * v.shape[1] > 1):
            out[_key(k[:-1])] = (int(v.shape[0]), int(v.shape[1]), int(v.shape[3]))
    return out


def init(params: PyTree, num_tasks: int, kernel_size: int = 3, full: bool = False) -> dict[str, jax.Array]:
    """Dirac depthwise kernels ``{path: [T, k, k, C]}`` for every wrapped convolution of ``params``.

    Raises:
      ValueError: ``kernel_size`` is not a positive odd number, or no convolution is wrapped.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"reprogramming kernel_size must be a positive odd number, got {kernel_size}")
    convs = conv_paths(params, full)
    if not convs:
        raise ValueError("reprogramming found no convolution to wrap (no rank-4 'kernel' parameter"
                         + ("" if full else " with a kernel larger than 1x1; try full=True") + ")")
    c = kernel_size // 2
    out = {}
    for path, (_, _, ch) in convs.items():
        k = jnp.zeros((kernel_size, kernel_size, ch), jnp.float32).at[c, c].set(1.0)
        out[path] = jnp.broadcast_to(k, (num_tasks,) + k.shape).copy()
    return out


def depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise convolution of ``x [B, H, W, C]`` with SAME padding, stride 1, no bias.

    ``kernel`` is ``[k, k, C]`` (one filter per channel, shared by the batch) or ``[B, k, k, C]`` (one
    per sample). Equals PyTorch's ``Conv2d(C, C, k, padding=k // 2, groups=C, bias=False)`` with
    weight ``kernel.transpose(2, 0, 1)[:, None]``.

    Computed with shifted, channel-scaled copies of ``x`` rather than a grouped
    ``conv_general_dilated``, which XLA runs several times slower on CPU (BENCHMARKS.md): first, for
    each kernel column ``j``, the vertical part ``sum_i x[h + i - p] * kernel[i, j]``; then the ``k``
    column sums, each shifted horizontally by ``j - p``. XLA fuses each stage into one pass.
    """
    k = kernel.shape[-3]
    if kernel.shape[-2] != k or k % 2 == 0:
        raise ValueError(f"depthwise kernel must be k x k with k odd, got shape {kernel.shape}")
    p = k // 2
    h, w = x.shape[1], x.shape[2]
    kern = kernel.astype(x.dtype)
    if kern.ndim == 4:  # per sample: [B, 1, 1, C] factors
        kern = kern[:, :, :, None, None, :]
    tap = lambda i, j: kern[:, i, j] if kern.ndim == 6 else kern[i, j]  # noqa: E731
    xp = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0)))
    cols = [sum(xp[:, i:i + h] * tap(i, j) for i in range(k)) for j in range(k)]
    cols = [jnp.pad(c, ((0, 0), (0, 0), (p, p), (0, 0))) for c in cols]
    return sum(c[:, :, j:j + w] for j, c in enumerate(cols))


def _pick(leaf: jax.Array, tid) -> jax.Array:
    """Row ``tid`` of a per-task leaf: ``[...]`` for a scalar id, ``[B, ...]`` for ``[B]`` ids."""
    return leaf[tid]


def _intercepting(apply: Callable, interceptor) -> Callable:
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return apply(*args, **kwargs)
    return wrapped


def reprogrammed(apply: Callable, kernels: dict[str, jax.Array], tid) -> Callable:
    """``apply`` with task ``tid``'s depthwise reprogramming after each wrapped convolution.

    Args:
      apply: any function that runs Flax modules (e.g. :attr:`clax.models.Backbone.apply`).
      kernels: ``{path: [T, k, k, C]}`` from :func:`init` (or row-selected ``[k, k, C]`` when ``tid``
        is None).
      tid: scalar task id, ``[B]`` task ids, or None when ``kernels`` already hold one task's row.

    Returns:
      A function with ``apply``'s signature and outputs.
    """
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Conv):
            k = kernels.get(_key(context.module.path))
            if k is not None:
                out = depthwise(out, k if tid is None else _pick(k, tid))
        return out

    return _intercepting(apply, interceptor)


def batchnorm_paths(params: PyTree, stats: PyTree) -> list[str]:
    """Paths of the BatchNorm layers: modules with ``scale``/``bias`` params and ``mean``/``var`` stats."""
    p, s = flatten_dict(params), flatten_dict(stats)
    return [_key(k[:-1]) for k in p if k[-1] == "scale" and k[:-1] + ("mean",) in s]


def init_batchnorm(params: PyTree, stats: PyTree, num_tasks: int) -> tuple[dict, dict]:
    """Per-task copies of every BatchNorm's parameters and statistics, from the backbone's own.

    Returns:
      ``({path: {"scale": [T, C], "bias": [T, C]}}, {path: {"mean": [T, C], "var": [T, C]}})``.
    """
    p, s = flatten_dict(params), flatten_dict(stats)
    rep = lambda a: jnp.broadcast_to(a, (num_tasks,) + a.shape).copy()
    bn_p, bn_s = {}, {}
    for path in batchnorm_paths(params, stats):
        k = tuple(path.split("."))
        bn_p[path] = {"scale": rep(p[k + ("scale",)]), "bias": rep(p[k + ("bias",)])}
        bn_s[path] = {"mean": rep(s[k + ("mean",)]), "var": rep(s[k + ("var",)])}
    return bn_p, bn_s


def task_batchnorm(apply: Callable, bn_params: dict, bn_stats: dict, tid) -> Callable:
    """``apply`` with every BatchNorm replaced by task ``tid``'s own (see the module docstring).

    Args:
      apply: any function that runs Flax modules.
      bn_params: ``{path: {"scale": [T, C], "bias": [T, C]}}``.
      bn_stats: ``{path: {"mean": [T, C], "var": [T, C]}}``.
      tid: scalar task id, or ``[B]`` ids (evaluation only: a training batch is one task's).

    Returns:
      A function returning ``(apply's output, new_stats)``, ``new_stats`` holding task ``tid``'s
      updated running statistics ``{path: {"mean": [C], "var": [C]}}`` for the layers that ran in
      training mode (empty in evaluation).
    """
    new_stats: dict = {}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, nn.BatchNorm):
            return next_fun(*args, **kwargs)
        path = _key(m.path)
        if path not in bn_params:
            return next_fun(*args, **kwargs)
        x = args[0]
        scale, bias = _pick(bn_params[path]["scale"], tid), _pick(bn_params[path]["bias"], tid)
        ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
        train = not (m.use_running_average if ura is None else ura)
        if train:
            if jnp.ndim(tid) != 0:
                raise ValueError("task_batchnorm: training needs one task id per batch (a scalar tid)")
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)  # as nn.BatchNorm
            ra_m, ra_v = bn_stats[path]["mean"][tid], bn_stats[path]["var"][tid]
            new_stats[path] = {"mean": m.momentum * ra_m + (1 - m.momentum) * mean,
                               "var": m.momentum * ra_v + (1 - m.momentum) * var}
        else:
            mean, var = _pick(bn_stats[path]["mean"], tid), _pick(bn_stats[path]["var"], tid)
        if jnp.ndim(tid) == 1:  # per-sample rows [B, C] broadcast over the spatial axes
            shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
            mean, var, scale, bias = (a.reshape(shape) for a in (mean, var, scale, bias))
        y = (x - mean) * jax.lax.rsqrt(var + m.epsilon)
        return y * scale + bias

    inner = _intercepting(apply, interceptor)

    def wrapped(*args, **kwargs):
        new_stats.clear()
        out = inner(*args, **kwargs)
        return out, dict(new_stats)

    return wrapped


def model(ctx, params: PyTree, stats: PyTree, kernel_size: int = 3, full: bool = False, name: str = "clr"):
    """CLR's network (:class:`clax.compose.Model`, TIL only): the frozen backbone ``params`` / ``stats``
    (``frozen["backbone"]``) under task ``t``'s :func:`reprogrammed` kernels and :func:`task_batchnorm`,
    then task ``t``'s linear head, outputs beyond the task's classes masked to -1e9.

    State: ``per_task`` = ``reprogram {path: [T, k, k, C]}``, ``bn {path: {scale, bias: [T, C]}}`` (from
    the backbone's own), ``head {kernel [T, D, C], bias [T, C]}``; ``state["bn"] {path: {mean, var: [T, C]}}``.
    A training batch's BatchNorm statistics are the whole batch's; rows of other tasks (rehearsal) are
    scored under their own task in evaluation mode (:func:`clax.transforms.frozen.train_rows`).
    """
    T, module, out_mask = ctx.num_tasks, ctx.backbone.module, ctx.output_mask()

    def init_state(key):
        bn_p, bn_s = init_batchnorm(params, stats, T)
        head = jax.vmap(lambda k: classifier.init_head(k, ctx.backbone.feature_dim, ctx.num_outputs))(
            jax.random.split(key, T))
        per_task = {"reprogram": init(params, T, kernel_size, full), "bn": bn_p, "head": head}
        return CLState(frozen={"backbone": params}, shared={}, per_task=per_task, state={"bn": bn_s}, extra={})

    def run_backbone(p, x, train):
        return module.apply({"params": p}, x, train=train)

    def run(cl, x, t, train):
        """Task ``t``'s logits ``[B, C]`` (t a scalar) and the state with its updated BatchNorm statistics."""
        pt = cl.per_task
        fn = task_batchnorm(reprogrammed(run_backbone, pt["reprogram"], t), pt["bn"], cl.state["bn"], t)
        f, new_stats = fn(cl.frozen["backbone"], x, train)
        logits = jnp.where(out_mask[t], f @ pt["head"]["kernel"][t] + pt["head"]["bias"][t], classifier.NEG)
        bn = jax.tree.map(lambda a, r: a.at[t].set(r), cl.state["bn"], new_stats) if new_stats else cl.state["bn"]
        return logits, {**cl.state, "bn": bn}

    def forward(cl, x, tid, t, train, key):
        logits, state = train_rows(run, cl, x, tid, t, T) if train else (by_task(
            lambda s: run(cl, x, s, False)[0], tid, T), cl.state)
        return logits, {}, state

    def predict(cl, x, tid):
        if tid is None:
            raise ValueError(f"method {name!r} needs task ids (TIL)")
        return by_task(lambda s: run(cl, x, s, False)[0], tid, T)

    return Model(name, init_state, forward, predict, scenarios=("til",), scalar_tid=True)


def statistics(name: str = "task_batchnorm"):
    """The per-task BatchNorm statistics (``state["bn"]``, not trained, so not in the trainer's per-task
    row) as stored bytes of each task (a :class:`clax.compose.Transform` with ``task_bytes`` only)."""
    return Transform(name, task_bytes=lambda cl, t: P.nbytes(P.task_row(cl.state["bn"], t)))
