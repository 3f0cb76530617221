"""Step time of ibm and wsn beside a plain step of the same network, and total training time.

For each of finetune (the plain step: same backbone, per-task heads, no masks), wsn and ibm, builds
the trainer's own compiled train step (:class:`clax.train.Steps`) on split-digits (TIL) and reports the
median time of a step after warm-up, and its ratio to the plain step. Then trains wsn and ibm through
the same run (the registry's defaults: same epochs, batch, lr) and reports ``timing.train_s``.

    python benchmarks/isolation_step.py                              # MLP [256, 256], batch 32
    python benchmarks/isolation_step.py --backbone resnet18 --nf 8   # reduced ResNet-18, batch 32
    python benchmarks/isolation_step.py --rounds 3 --no-total        # plain/wsn/ibm interleaved 3 times

With ``--rounds R`` each step is timed R times, the methods interleaved (plain, wsn, ibm, plain, ...), and
the medians are reported: on a shared, noisy CPU the ratio is then taken over the same stretch of time.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import train_step_seconds  # noqa: E402


def step_time(method: str, backbone: str, nf: int, iters: int) -> float:
    """Median seconds of one compiled train step of ``method`` (task 1, so masks are consolidated)."""
    from clax.config import apply_overrides, default_config, train_config
    from clax.runner import build

    cfg = default_config(method)
    cfg["scenario"] = "til"
    if backbone != "mlp":
        cfg = apply_overrides(cfg, [f"backbone.name={backbone}", f"backbone.nf={nf}"])
    bench, ctx, meth = build(cfg)
    tc = train_config(cfg)
    return train_step_seconds(meth, bench, t=1, iters=iters, batch_size=tc.batch_size, warmup=5, cfg=tc)


def total_time(method: str, seed: int) -> dict:
    from clax.config import default_config
    from clax.runner import run

    cfg = {**default_config(method), "seed": seed}
    r = run(cfg, None, progress=False)
    return {"train_s": r["timing"]["train_s"], "steps": r["timing"]["steps"], "acc": r["acc"],
            "epochs": cfg["train"]["epochs"]}


def main(argv=None):
    p = argparse.ArgumentParser(description="ibm and wsn step time vs a plain step; total training time")
    p.add_argument("--backbone", default="mlp", choices=["mlp", "resnet18"])
    p.add_argument("--nf", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=1, help="time every step this many times, interleaved; medians")
    p.add_argument("--no-total", action="store_true", help="skip the total training time (MLP)")
    a = p.parse_args(argv)
    times = {m: [] for m in ("finetune", "wsn", "ibm")}
    for _ in range(a.rounds):
        for m in times:
            times[m].append(step_time(m, a.backbone, a.nf, a.iters))
    med = {m: float(np.median(v)) for m, v in times.items()}
    base = med["finetune"]
    print(f"backbone {a.backbone}{'' if a.backbone == 'mlp' else f' nf={a.nf}'}, batch 32, median of {a.iters} steps"
          f"{f', median of {a.rounds} interleaved rounds' if a.rounds > 1 else ''}")
    print(f"{'step':>10} {'ms':>8} {'x plain':>8}")
    print(f"{'plain':>10} {base * 1e3:8.2f} {1.0:8.2f}")
    for m in ("wsn", "ibm"):
        print(f"{m:>10} {med[m] * 1e3:8.2f} {med[m] / base:8.2f}")
    if a.backbone == "mlp" and not a.no_total:
        tot = {m: [total_time(m, s) for s in a.seeds] for m in ("wsn", "ibm")}
        mean = {m: float(np.mean([r["train_s"] for r in v])) for m, v in tot.items()}
        print(f"total training, split-digits, registry defaults ({tot['ibm'][0]['epochs']} epochs/task), "
              f"seeds {a.seeds}: wsn {mean['wsn']:.1f} s, ibm {mean['ibm']:.1f} s, ibm/wsn {mean['ibm'] / mean['wsn']:.2f}")


if __name__ == "__main__":
    main()
