"""Shared timing helper of the step benchmarks: the trainer's own compiled step, median after warm-up."""
from __future__ import annotations

import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from clax.data import Benchmark
from clax.methods.base import Method, TaskData
from clax.train import Steps, TrainConfig, TrainState, make_optimizer, trainable


def prepared_step(method: Method, bench: Benchmark, t: int = 0, batch_size: int = 32, begin_task: bool = False,
                  cfg: TrainConfig | None = None, mesh=None, compiler_options: dict | None = None):
    """``(steps, state, batch, t)``: the trainer's :class:`~clax.train.Steps` of ``method`` and what its
    ``train_step`` is called with on one TIL batch of task ``t`` of ``bench`` (see
    :func:`train_step_seconds`, which times it)."""
    cfg = cfg or TrainConfig(batch_size=batch_size, lr=1e-3)
    tx = make_optimizer(cfg, method)
    steps = Steps(method, tx, "til", compiler_options)
    cl = method.init(jax.random.PRNGKey(0))
    task = bench.tasks[t]
    y = task.targets(task.y_train, "til")
    if begin_task:
        cl = method.begin_task(cl, TaskData(t, task.x_train, y, jax.random.PRNGKey(1), batch_size))
    tt = jnp.int32(t)
    ts = TrainState(cl, tx.init(trainable(cl, tt)), jax.random.PRNGKey(2), jnp.zeros((), jnp.int32))
    idx = np.resize(np.arange(len(y)), batch_size)
    batch = {"x": jnp.asarray(task.x_train[idx]), "y": jnp.asarray(y[idx]), "tid": jnp.full(batch_size, t, jnp.int32)}
    if mesh is not None:
        from clax import mesh as M

        layout = M.state_sharding(ts, mesh)
        steps.shard(layout)
        ts, batch = M.place(ts, layout), M.put_batch(jax.device_get(batch), mesh)
    return steps, ts, batch, tt


def train_step_seconds(method: Method, bench: Benchmark, t: int = 0, iters: int = 20, batch_size: int = 32,
                       warmup: int = 3, begin_task: bool = False, cfg: TrainConfig | None = None,
                       mesh=None, blocks: int = 1, compiler_options: dict | None = None,
                       hold=contextlib.nullcontext) -> float:
    """Median seconds of ``iters`` calls of the compiled train step of ``method`` on one TIL batch of
    task ``t`` of ``bench`` (after ``warmup`` calls, which include the compilation); with ``blocks > 1``
    the lowest median of that many blocks of ``iters`` calls (a block's median on these shared 2-core
    machines moves by up to 2x with what else runs: the lowest is the step's own cost).

    With ``begin_task`` the method's ``begin_task`` hook runs first on task ``t``'s training data (as
    the trainer does), e.g. for methods that build per-task state there. With ``mesh`` (a
    :mod:`clax.mesh` mesh) the state is laid out on it and the batch split along its data axis, as
    :func:`clax.train.fit` does. ``compiler_options`` are the step's XLA options: pass
    ``clax.models.step_options(ctx.backbone)`` to time the step as :func:`clax.train.fit` compiles it.
    """
    steps, ts, batch, tt = prepared_step(method, bench, t, batch_size, begin_task, cfg, mesh, compiler_options)
    for _ in range(warmup):
        ts, _ = steps.train_step(ts, batch, tt)
    jax.block_until_ready(ts)
    medians = []
    with hold():
        for _ in range(max(1, blocks)):
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                ts, m = steps.train_step(ts, batch, tt)
                jax.block_until_ready(ts)
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
    return min(medians)
