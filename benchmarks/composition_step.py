"""Step time of the composed baselines beside a plain (finetune) step of the same network.

Builds the trainer's own compiled train step (:class:`clax.train.Steps`) of each method on split-digits
(TIL, MLP [256, 256], batch 32, task 1 so that every transform has state from task 0) and reports the
median step time and its ratio to finetune's. Measurements are interleaved over ``--rounds`` rounds
and the median of each method's round medians is reported, so that a shared machine's noise falls on
every method alike.

    python benchmarks/composition_step.py
    python benchmarks/composition_step.py --methods finetune si --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import train_step_seconds  # noqa: E402

METHODS = ("finetune", "si", "ewc", "lwf", "replay", "derpp", "replay+lwf")


def build(method: str, scenario: str = "til"):
    """``(benchmark, method, train config)`` of ``method``'s registry defaults on split-digits."""
    from clax.config import default_config, train_config
    from clax.runner import build as build_run

    cfg = default_config(method)
    cfg["scenario"] = scenario
    bench, _, meth = build_run(cfg)
    return bench, meth, train_config(cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description="composed methods' step time vs finetune's (split-digits, TIL)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    names = ["finetune"] + [m for m in a.methods if m != "finetune"]
    built = {m: build(m) for m in names}
    times: dict = {m: [] for m in names}
    for _ in range(a.rounds):
        for m in names:
            bench, meth, tc = built[m]
            times[m].append(train_step_seconds(meth, bench, t=1, iters=a.iters, batch_size=tc.batch_size,
                                               warmup=5, cfg=tc, begin_task=True))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"split-digits TIL, MLP [256, 256], batch 32, task 1; median of {a.rounds} interleaved rounds "
          f"of {a.iters} steps")
    print(f"{'method':>12} {'ms':>8} {'x finetune':>11}")
    for m in names:
        print(f"{m:>12} {med[m] * 1e3:8.3f} {med[m] / med['finetune']:11.2f}")


if __name__ == "__main__":
    main()
