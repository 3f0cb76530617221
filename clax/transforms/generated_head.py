"""A trained backbone whose per-task linear heads a small hypernetwork generates from a task-embedding
table (PAH's model: the table is the class prototypes, :mod:`clax.transforms.prototype`).

``cl.shared = {"backbone", "hnet", <table>}``, the table ``[T, ...]`` (one embedding per task, each
flattened into the hypernetwork's input); ``cl.state = {"backbone": BatchNorm statistics}``; nothing
per task. Task ``j``'s head is ``hn.apply(hnet, table[j].reshape(-1))``: ``{"kernel": [D, C]}`` (and
``"bias": [C]`` where the hypernetwork's target has one). ``forward`` computes every task's head on
the features, ``aux["outputs"] [B, T, C]`` (what :meth:`Model.outputs` returns, so the step's
cross-entropy and an old-task distillation share one computation), and a sample's logits are its
task's row, outputs beyond the task's classes masked.

BatchNorm outside the training batch's own pass (``bn``): ``"running"`` (clax's default) uses the
running statistics, so a prediction is a function of its image alone; ``"batch"`` (the PAH authors'
code, which never calls ``eval()``) normalises every such pass by its own batch statistics (the test
predictions, a teacher on the current batch, :func:`own_outputs`' per-task passes) without updating
the stored ones. With ``"batch"`` a test prediction depends on the other images of its evaluation
batch (clax pads the last batch with repeats of its own images). Backbones without BatchNorm are
unaffected.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from clax.compose import Model
from clax.partition import CLState
from clax.transforms.classifier import NEG
from clax.transforms.hypernet import Hypernet

#: where BatchNorm's statistics come from outside the training batch's own pass
BN_MODES = ("running", "batch")


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


def features(ctx, cl, x, train: bool, bn: str = "running"):
    """``(features, new state)`` of ``x``: the training pass (``train``, statistics updated) or a pass
    outside it, whose statistics follow ``bn`` and are not updated."""
    f, stats = ctx.backbone.apply(cl.shared["backbone"], cl.state["backbone"], x, train or bn == "batch")
    return f, ({**cl.state, "backbone": stats} if train else cl.state)


def heads(hn: Hypernet, cl, table: str = "protos") -> dict:
    """Every task's generated head: ``{"kernel": [T, D, C]}`` (and ``"bias": [T, C]``)."""
    return jax.vmap(lambda e: hn.apply(cl.shared["hnet"], e.reshape(-1)))(cl.shared[table])


def _bias(hd):
    return hd["bias"][None] if "bias" in hd else 0.0


def model(ctx, hn: Hypernet, table_init: Callable, hnet_init: Callable, bn: str = "running",
          table: str = "protos", name: str = "generated_head") -> Model:
    """The generated-head network as a :class:`clax.compose.Model` (TIL).

    Args:
      ctx: the stream's context (backbone, task classes).
      hn: the hypernetwork (embedding -> a head ``{"kernel" [D, C]}`` or with ``"bias"``).
      table_init: ``key -> [T, ...]`` the task-embedding table's initial value.
      hnet_init: ``key -> hypernetwork params``.
      bn: ``"running"`` or ``"batch"`` (module docstring).
      table: the table's name in ``cl.shared``.
    """
    cmask = jnp.asarray(ctx.task_classes >= 0)

    def init(key):
        kb, kh, kp = jax.random.split(key, 3)
        params, stats = ctx.backbone.init(kb)
        shared = {"backbone": params, "hnet": hnet_init(kh), table: table_init(kp)}
        return CLState(frozen={}, shared=shared, per_task={}, state={"backbone": stats}, extra={})

    def forward(cl, x, tid, t, train, key):
        f, state = features(ctx, cl, x, train, bn)
        hd = heads(hn, cl, table)
        every = jnp.einsum("bd,tdc->btc", f, hd["kernel"]) + _bias(hd)  # [B, T, C]
        own = jnp.take_along_axis(every, tid[:, None, None], axis=1)[:, 0]
        return jnp.where(cmask[tid], own, NEG), {"features": f, "outputs": every}, state

    def predict(cl, x, tid):
        f, _ = features(ctx, cl, x, False, bn)
        hd = heads(hn, cl, table)
        out = jnp.einsum("bd,bdc->bc", f, hd["kernel"][tid])
        out = out + hd["bias"][tid] if "bias" in hd else out
        return jnp.where(cmask[tid], out, NEG)

    return Model(name, init, forward, predict, outputs=lambda cl, aux: aux["outputs"], scenarios=("til",))


def own_outputs(ctx, hn: Hypernet, inputs: Callable, bn: str = "running", table: str = "protos") -> Callable:
    """``cl -> [N, T, C]``: task ``j``'s generated head on task ``j``'s own inputs, entry ``[n, j]``.

    ``inputs(table) -> [T, N, *input_shape]`` builds each task's ``N`` inputs from the embedding
    table (PAH: the prototypes as images). Outside the training pass: with ``bn="running"`` all
    ``T * N`` inputs go through the backbone as one eval-mode batch; with ``bn="batch"`` each task's
    ``N`` inputs are one batch normalised by its own statistics (the PAH authors' ``pass_prototypes``).
    """

    def run(cl):
        x = inputs(cl.shared[table])
        T, N = x.shape[:2]
        if bn == "batch":
            f = jax.vmap(lambda xj: features(ctx, cl, xj, False, bn)[0])(x)
        else:
            f = features(ctx, cl, x.reshape((T * N,) + x.shape[2:]), False, bn)[0].reshape(T, N, -1)
        hd = heads(hn, cl, table)
        return jnp.einsum("jcd,jdk->cjk", f, hd["kernel"]) + _bias(hd)

    return run
