"""The shared test battery: helpers that every method's tests use on tiny shapes.

``quick_run`` trains a method through a short stream and returns the fit output together with the
logits recorded for task 0's test set right after task 0 and after the last task, so that a test can
assert zero forgetting bit-for-bit, learning, checkpoint round-trips and compile counts.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from clax.config import apply_overrides, default_config, train_config
from clax.data import Benchmark, split_digits
from clax.data.stream import Task
from clax.runner import build
from clax.train import fit


def quick_config(method: str, benchmark: str = "split-digits", scenario: str | None = None,
                 epochs: int = 1, sets=()) -> dict:
    cfg = default_config(method, benchmark)
    if scenario:
        cfg["scenario"] = scenario
    cfg["train"]["epochs"] = epochs
    return apply_overrides(cfg, list(sets))


def task_logits(method, ctx, cl, task, scenario):
    """Logits of ``method`` on ``task``'s test set (TIL: with its task id)."""
    x = jnp.asarray(task.x_test)
    tid = jnp.full((x.shape[0],), task.task_id, jnp.int32) if scenario == "til" else None
    return np.asarray(jax.jit(method.predict)(cl, x, tid))


def quick_run(method: str, benchmark: str = "split-digits", scenario: str | None = None, epochs: int = 1,
              sets=(), watch_task: int = 0, num_tasks: int | None = None) -> dict:
    """Runs ``method`` and records task ``watch_task``'s test logits after that task and at the end."""
    cfg = quick_config(method, benchmark, scenario, epochs, sets)
    bench, ctx, meth = build(cfg)
    if num_tasks:
        bench = type(bench)(bench.name, bench.tasks[:num_tasks], bench.num_classes, bench.input_shape)
        from clax.train import make_context
        ctx = make_context(ctx.backbone, bench, ctx.scenario)
        from clax.methods import get_method
        from clax.methods import method_settings
        meth = get_method(cfg["method"], ctx, **method_settings(cfg))
    seen = {}

    def on_task_end(t, ts, A):
        if t == watch_task:
            seen["after"] = task_logits(meth, ctx, ts.cl, bench.tasks[watch_task], ctx.scenario)

    out = fit(meth, ctx, bench, train_config(cfg), progress=False, on_task_end=on_task_end)
    out["logits_after_watch"] = seen["after"]
    out["logits_final"] = task_logits(meth, ctx, out["state"].cl, bench.tasks[watch_task], ctx.scenario)
    out["method"], out["ctx"], out["bench"], out["cfg"] = meth, ctx, bench, cfg
    return out


def assert_zero_forgetting(out: dict) -> None:
    """Old task's logits bit-for-bit unchanged and BWT exactly 0."""
    np.testing.assert_array_equal(out["logits_after_watch"], out["logits_final"])
    assert out["bwt"] == 0.0, out["bwt"]


def assert_no_recompile_after_first_task(out: dict) -> None:
    """Tasks after the first add no compilation of the train or eval step."""
    counts = out["timing"]["compiles_after_task"]
    assert all(c == counts[0] for c in counts), counts


def tiny_digits(num_tasks: int = 2, n_train: int = 48, n_test: int = 40) -> Benchmark:
    """split-digits cut to its first ``num_tasks`` tasks of ``n_train`` / ``n_test`` samples (seed 0)."""
    full = split_digits(seed=0)
    tasks = tuple(Task(t.task_id, t.classes, t.x_train[:n_train], t.y_train[:n_train], t.x_test[:n_test],
                       t.y_test[:n_test]) for t in full.tasks[:num_tasks])
    return Benchmark(full.name, tasks, full.num_classes, full.input_shape, full.class_names)


def snapshot(root) -> dict:
    """Every path under ``root`` with, for files, its bytes and modification time (to assert that a
    command wrote nothing)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = "dir"
        for n in files:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_mtime_ns)
    return out
