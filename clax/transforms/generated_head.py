"""A trained backbone whose per-task linear heads a small hypernetwork generates from a task-embedding
table (PAH's model: the table is the class prototypes, :mod:`clax.transforms.prototype`).

``cl.shared = {"backbone", "hnet", <table>}``, the table ``[T, ...]`` (one embedding per task, each
flattened into the hypernetwork's input); ``cl.state = {"backbone": BatchNorm statistics}``; nothing
per task. Task ``j``'s head is ``hn.apply(hnet, table[j].reshape(-1))``: ``{"kernel": [D, C]}`` (and
``"bias": [C]`` where the hypernetwork's target has one). ``forward`` computes every task's head on
the features, ``aux["outputs"] [B, T, C]`` (what :meth:`Model.outputs` returns, so the step's
cross-entropy and an old-task distillation share one computation), and a sample's logits are its
task's row, outputs beyond the task's classes masked.

Cost that follows the tasks seen, not the stream's length (``block``): the table is preallocated for
all ``T`` tasks, so shapes are fixed and a new task adds no compilation, but the training pass works
over the shortest prefix of the table of ``block``, ``2 block``, ``4 block``, ... tasks
(:func:`prefix_sizes`, one ``lax.switch``) that holds the tasks it needs (up to ``max(t, tid)``): the
rows of ``aux["outputs"]`` after it are 0. A task's outputs do not depend on the other tasks, so the
rows it computes are the ones the whole table gives. ``block >= T``: the whole table.

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


def task_blocks(num_tasks: int, block: int) -> tuple[int, list[int]]:
    """``(K, starts)``: blocks of ``K = min(block, num_tasks)`` consecutive tasks covering ``num_tasks``,
    block ``i`` starting at ``starts[i] = min(i * K, num_tasks - K)`` (so the last block may overlap its
    neighbour instead of running past the table).

    Raises:
      ValueError: ``block < 1``.
    """
    if block < 1:
        raise ValueError(f"block must be a positive number of tasks, got {block}")
    k = min(int(block), int(num_tasks))
    return k, [min(i * k, num_tasks - k) for i in range(-(-num_tasks // k))]


def prefix_sizes(num_tasks: int, block: int) -> list[int]:
    """The prefixes of the table the training pass may compute: ``block, 2 block, 4 block, ...``, the
    last one ``num_tasks`` (one size, the whole table, where ``block >= num_tasks``).

    Raises:
      ValueError: ``block < 1``.
    """
    k, _ = task_blocks(num_tasks, block)
    sizes = [k]
    while sizes[-1] < num_tasks:
        sizes.append(min(2 * sizes[-1], num_tasks))
    return sizes


def every_outputs(hn: Hypernet, cl, f, needed, block: int, table: str = "protos"):
    """``[B, T, C]``: every task's generated head on the features ``f [B, D]``, computed only for the
    shortest prefix of :func:`prefix_sizes` that holds the tasks ``< needed`` (traced); the other rows
    are 0.

    One ``lax.switch`` over the prefix sizes (forward and backward), so the cost follows ``needed``
    (at most twice its blocks), not ``T``. Each branch is rematerialised in the backward pass
    (``jax.checkpoint``): differentiating a switch otherwise makes every branch return the residuals of
    all branches, zero-filled (a ``[T, D, C]`` heads array for the whole table's branch, written at
    every step whatever the prefix). With a single size it is the whole table's computation.
    """
    sizes = prefix_sizes(cl.shared[table].shape[0], block)

    def prefix(n):
        def run(f, tab):
            hd = heads(hn, cl.replace(shared={**cl.shared, table: tab[:n]}), table)
            out = jnp.einsum("bd,tdc->btc", f, hd["kernel"]) + _bias(hd)
            return jnp.pad(out, ((0, 0), (0, tab.shape[0] - n), (0, 0)))
        return run

    if len(sizes) == 1:
        return prefix(sizes[0])(f, cl.shared[table])
    index = jnp.sum(jnp.asarray(sizes[:-1]) < needed)  # the first size >= needed
    return jax.lax.switch(index, [jax.checkpoint(prefix(n)) for n in sizes], f, cl.shared[table])


def model(ctx, hn: Hypernet, table_init: Callable, hnet_init: Callable, bn: str = "running",
          table: str = "protos", name: str = "generated_head", block: int | None = None) -> Model:
    """The generated-head network as a :class:`clax.compose.Model` (TIL).

    Args:
      ctx: the stream's context (backbone, task classes).
      hn: the hypernetwork (embedding -> a head ``{"kernel" [D, C]}`` or with ``"bias"``).
      table_init: ``key -> [T, ...]`` the task-embedding table's initial value.
      hnet_init: ``key -> hypernetwork params``.
      bn: ``"running"`` or ``"batch"`` (module docstring).
      table: the table's name in ``cl.shared``.
      block: tasks per block of the training pass (module docstring); ``None``: the whole table.
    """
    blk = ctx.num_tasks if block is None else block
    task_blocks(ctx.num_tasks, blk)  # checks it
    cmask = jnp.asarray(ctx.task_classes >= 0)

    def init(key):
        kb, kh, kp = jax.random.split(key, 3)
        params, stats = ctx.backbone.init(kb)
        shared = {"backbone": params, "hnet": hnet_init(kh), table: table_init(kp)}
        return CLState(frozen={}, shared=shared, per_task={}, state={"backbone": stats}, extra={})

    def forward(cl, x, tid, t, train, key):
        f, state = features(ctx, cl, x, train, bn)
        needed = jnp.maximum(t, jnp.max(tid) + 1)  # the old tasks and the batch's own
        every = every_outputs(hn, cl, f, needed, blk, table)  # [B, T, C]
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
