"""Step time against the tasks seen, for the methods whose per-step work can grow with the stream
(issue 17, item 3).

One 20-task stream (permuted-digits, 10 classes a task, TIL), each method with its registry defaults
(its own backbone settings and batch size), and the trainer's compiled step timed at the k-th task
(``t = k - 1``) for k = 2, 5, 10, 20, after that task's ``begin_task`` (so snapshots and buffers exist;
old tasks' rows hold their initial values, which changes no shape and no amount of work). The step
compiles once per method (the task id is traced), so the ratios are the work alone.

    python benchmarks/steps_vs_tasks.py [--methods hnet pah ...] [--iters 20]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import train_step_seconds  # noqa: E402

METHODS = ("finetune", "ewc", "lwf", "replay", "si", "hnet", "pah", "wsn", "ibm")
SEEN = (2, 5, 10, 20)


def build(name: str, tasks: int = 20):
    """``(benchmark, method, train config)`` of ``name`` on permuted-digits cut to ``tasks`` tasks."""
    from clax.config import default_config, train_config
    from clax.data.digits import permuted_digits
    from clax.methods import get_method
    from clax.models import get_backbone
    from clax.train import make_context

    cfg = default_config(name, "permuted-digits")
    cfg["scenario"] = "til"
    bench = permuted_digits(seed=0, num_tasks=tasks)
    bb = dict(cfg["backbone"])
    ctx = make_context(get_backbone(bb.pop("name"), bench.input_shape, **bb), bench, "til")
    return bench, get_method(name, ctx, **cfg[name]), train_config(cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description="step time against the tasks seen on a 20-task stream")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args(argv)
    print(f"permuted-digits, 20 tasks, TIL, registry defaults; median of {a.iters} steps; ms (x the step at k=2)")
    print(f"{'method':>9} " + " ".join(f"{'k=' + str(k):>15}" for k in SEEN))
    for name in a.methods:
        bench, meth, tc = build(name)
        times = {k: train_step_seconds(meth, bench, t=k - 1, iters=a.iters, batch_size=tc.batch_size, warmup=3,
                                       begin_task=True, cfg=tc) for k in SEEN}
        print(f"{name:>9} " + " ".join(f"{times[k] * 1e3:8.2f} ({times[k] / times[2]:4.2f})" for k in SEEN),
              flush=True)


if __name__ == "__main__":
    main()
