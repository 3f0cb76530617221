"""Train-step cost of the hypernetwork methods against a plain step of the same network.

* ``hnet`` generating a whole ResNet-32 (chunks of 7000) vs ``finetune`` on a stored ResNet-32;
* ``pah`` (heads generated from prototypes, two optimiser steps) vs ``finetune`` on a stored reduced
  ResNet-18 (nf=20);
* ``pah``'s step on streams of T = 2, 5, 10, 20 tasks at the last task (t = T - 1): its distillation
  touches every old head and every old prototype. The table is preallocated for all T tasks and
  masked with ``j < t``, so the step's cost follows T (the stream length), not t.

Synthetic 32x32x3 inputs, 10 classes per task, TIL, batch 32; median of ``--iters`` timed steps after
a warm-up step (compilation excluded).

    python benchmarks/hypernet_step.py [--iters 20] [--nf32 16] [--nf18 20] [--pah-tasks 2,5,10,20]
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from clax.data.stream import Benchmark
from clax.methods import get_method
from clax.models import get_backbone
from clax.train import make_context

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import train_step_seconds  # noqa: E402


def _bench(num_tasks: int, classes: int = 10, n: int = 64) -> Benchmark:
    rng = np.random.default_rng(0)
    k = num_tasks * classes
    y = np.repeat(np.arange(k), max(1, n // classes))
    x = rng.random((len(y), 32, 32, 3), np.float32)
    return Benchmark.from_arrays("synthetic", x, y, x, y,  # every task needs test samples
                                 [list(range(t * classes, (t + 1) * classes)) for t in range(num_tasks)])


def step_time(method_name: str, backbone: str, bb_settings: dict, num_tasks: int, t: int, iters: int,
              settings: dict | None = None, batch: int = 32) -> float:
    """Median seconds of one compiled train step of ``method_name`` at task ``t``."""
    bench = _bench(num_tasks)
    ctx = make_context(get_backbone(backbone, bench.input_shape, **bb_settings), bench, "til")
    method = get_method(method_name, ctx, **(settings or {}))
    return train_step_seconds(method, bench, t=t, iters=iters, batch_size=batch, warmup=1, begin_task=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--nf32", type=int, default=16)
    p.add_argument("--nf18", type=int, default=20)
    p.add_argument("--pah-tasks", default="2,5,10,20")
    a = p.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}")
    r32 = {"nf": a.nf32}
    plain = step_time("finetune", "resnet32", r32, 5, 1, a.iters)
    hn = step_time("hnet", "resnet32", r32, 5, 1, a.iters, {"chunk_size": 7000})
    print(f"ResNet-32 nf={a.nf32}: finetune {plain * 1e3:.1f} ms, hnet {hn * 1e3:.1f} ms, ratio {hn / plain:.2f}")
    r18 = {"nf": a.nf18}
    plain = step_time("finetune", "resnet18", r18, 5, 1, a.iters)
    ph = step_time("pah", "resnet18", r18, 5, 1, a.iters)
    print(f"ResNet-18 nf={a.nf18}: finetune {plain * 1e3:.1f} ms, pah {ph * 1e3:.1f} ms, ratio {ph / plain:.2f}")
    base = None
    for T in (int(v) for v in a.pah_tasks.split(",")):
        s = step_time("pah", "resnet18", r18, T, T - 1, a.iters)
        base = base or s
        print(f"pah T={T:2d} (at task {T - 1:2d}): {s * 1e3:.1f} ms, x{s / base:.2f} of T={a.pah_tasks.split(',')[0]}")


if __name__ == "__main__":
    main()
