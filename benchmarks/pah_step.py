"""PAH's train step against the tasks seen, on streams of different lengths (issue 17, item 1).

PAH preallocates its prototype table for all ``T`` tasks of the stream. Its distillation touches the
old tasks ``j < t`` only; this script checks that the step's cost follows the tasks seen, not ``T``:
the step at the k-th task (``t = k - 1``, so ``k`` tasks seen, the current one included) of streams of
``T`` tasks, and its ratio to the step at the same task of the shortest stream.

Stream: permuted-digits cut to ``T`` tasks (10 classes a task, so the prototype pass runs 10 images
per old task), PAH's registry defaults (MLP [256, 256], AdamW), batch 32, TIL; the trainer's compiled
step, the lowest median of ``--blocks`` blocks of ``--iters`` timed steps after a warm-up (compilation
excluded), ``begin_task`` run first as in training.

With ``--old PATH`` (a checkout of the code before the change, e.g. ``git worktree add /tmp/wt HEAD``)
every figure is measured for the old code and this checkout alternately, each in its own
subprocess (``PYTHONPATH``), ``--rounds`` times, and the median is kept::

    python benchmarks/pah_step.py [--tasks 2,5,10,20] [--seen 2,5,10,20] [--iters 20] [--blocks 5] [--rounds 1]
                                  [--old /tmp/wt] [--backbone mlp|resnet18] [--set pah.KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
#: blocks of timed steps per figure, the lowest median kept (``--blocks``; also run_all's PAH row)
BLOCKS = 5
ROOT = os.path.dirname(HERE)


def measure(T: int, seen: list[int], iters: int, backbone: str, settings: dict, blocks: int = 1) -> dict:
    """``{k: seconds}``: the step at task ``t = k - 1`` of a ``T``-task stream, for every ``k <= T``."""
    import jax

    sys.path.insert(0, HERE)
    from _timing import train_step_seconds
    from clax.data.digits import permuted_digits
    from clax.methods import get_method
    from clax.models import get_backbone
    from clax.train import TrainConfig, make_context

    view = "image" if backbone == "resnet18" else "flat"
    bench = permuted_digits(0, view, num_tasks=T)
    bb = {"hidden": [256, 256]} if backbone == "mlp" else {"nf": 8}
    ctx = make_context(get_backbone(backbone, bench.input_shape, **bb), bench, "til")
    method = get_method("pah", ctx, **settings)
    cfg = TrainConfig(batch_size=32, lr=1e-3, optimizer="adamw", weight_decay=0.01)
    out = {}
    for k in seen:
        if k <= T:
            out[k] = train_step_seconds(method, bench, t=k - 1, iters=iters, warmup=2, begin_task=True, cfg=cfg,
                                        blocks=blocks)
    jax.clear_caches()
    return out


def _parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets:
        key, val = s.split("=", 1)
        out[key.removeprefix("pah.")] = json.loads(val) if val[:1] in "[{0123456789-tf" else val
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="2,5,10,20", help="stream lengths T")
    p.add_argument("--seen", default="2,5,10,20", help="tasks seen k (the step at t = k - 1)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="alternate old/new this many times, keep the median")
    p.add_argument("--blocks", type=int, default=BLOCKS, help="blocks of --iters steps per figure; the lowest median is kept")
    p.add_argument("--old", default="", help="a checkout of the old code, measured alternately with this one")
    p.add_argument("--backbone", default="mlp", choices=("mlp", "resnet18"))
    p.add_argument("--set", action="append", default=[], help="a PAH setting, pah.KEY=VALUE (this checkout only)")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    seen = [int(v) for v in a.seen.split(",")]
    if a.worker:
        print(json.dumps(measure(a.worker, seen, a.iters, a.backbone, _parse_sets(a.set), a.blocks)))
        return
    tasks = [int(v) for v in a.tasks.split(",")]
    codes = [("old", os.path.abspath(a.old)), ("new", ROOT)] if a.old else [("new", ROOT)]
    times = {(c, T): [] for c, _ in codes for T in tasks}
    for _ in range(a.rounds):
        for T in tasks:
            for c, path in codes:
                env = {**os.environ, "PYTHONPATH": path}
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(T), "--seen", a.seen,
                       "--iters", str(a.iters), "--backbone", a.backbone, "--blocks", str(a.blocks)]
                for s in a.set if c == "new" else []:
                    cmd += ["--set", s]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=path)
                if res.returncode:
                    sys.exit(f"{c} T={T} failed:\n{res.stderr[-3000:]}")
                times[(c, T)].append({int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()})
    med = {key: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for key, runs in times.items()}
    print(f"pah step (ms) at the k-th task (t = k - 1) of a T-task stream; backbone {a.backbone}, "
          f"{a.iters} iters, {a.rounds} round(s); ratio: to the same k in the shortest stream that has it")
    head = f"{'code':4s} {'k':>3s} " + " ".join(f"{'T=' + str(T):>16s}" for T in tasks)
    print(head)
    for c, _ in codes:
        for k in seen:
            cells = []
            base = next((med[(c, T)][k] for T in tasks if k in med[(c, T)]), None)
            for T in tasks:
                v = med[(c, T)].get(k)
                cells.append(f"{v * 1e3:8.2f} (x{v / base:4.2f})" if v is not None else " " * 16)
            print(f"{c:4s} {k:3d} " + " ".join(cells))
    if a.old:
        print("new / old at the same (k, T):")
        for k in seen:
            print(f"     {k:3d} " + " ".join(
                f"{med[('new', T)][k] / med[('old', T)][k]:16.2f}" if k in med[("new", T)] else " " * 16
                for T in tasks))


if __name__ == "__main__":
    main()
