"""Capacity story of the parameter-isolation methods: wsn, packnet and ibm on the same stream, same
epoch budget, several seeds; prints ACC, BWT, mean mask density, final capacity used and training
seconds (mean over seeds) and writes the per-task capacity figure.

    python experiments/capacity_plot.py --out capacity.png [--benchmark split-digits] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from clax.config import default_config
from clax.plot import capacity_plot
from clax.runner import run

METHODS = ("wsn", "packnet", "ibm")


def compare(benchmark: str = "split-digits", seeds=(0, 1, 2), methods=METHODS, sets=()) -> dict:
    """Runs each method for each seed; returns ``{method: {acc, bwt, mask_density, capacity_used,
    train_s}}`` with per-task lists and scalars averaged over seeds (``mean_density`` over tasks)."""
    from clax.config import apply_overrides

    out = {}
    for m in methods:
        rs = []
        for s in seeds:
            cfg = apply_overrides({**default_config(m, benchmark), "seed": s}, list(sets))
            rs.append(run(cfg, None, progress=False))
        mean = lambda k: np.mean([r[k] for r in rs], axis=0)  # noqa: E731
        out[m] = {"acc": float(mean("acc")), "bwt": float(mean("bwt")),
                  "bwt_max_abs": float(max(abs(r["bwt"]) for r in rs)),
                  "mask_density": mean("mask_density").tolist(), "capacity_used": mean("capacity_used").tolist(),
                  "mean_density": float(np.mean(mean("mask_density"))),
                  "train_s": float(np.mean([r["timing"]["train_s"] for r in rs])), "seeds": list(seeds),
                  "acc_per_seed": [float(r["acc"]) for r in rs],
                  "capacity_per_seed": [float(r["capacity_used"][-1]) for r in rs]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default="capacity.png")
    p.add_argument("--benchmark", default="split-digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    res = compare(a.benchmark, a.seeds, sets=a.set)
    print(f"{'method':>8} {'ACC':>6} {'BWT':>5} {'density':>7} {'capacity':>8} {'train_s':>7}")
    for m, r in res.items():
        print(f"{m:>8} {r['acc']:6.4f} {r['bwt']:5.1f} {r['mean_density']:7.3f} {r['capacity_used'][-1]:8.3f} "
              f"{r['train_s']:7.1f}   per seed: ACC {', '.join(f'{v:.4f}' for v in r['acc_per_seed'])}; "
              f"capacity {', '.join(f'{v:.3f}' for v in r['capacity_per_seed'])}")
    capacity_plot(res, a.out, f"{a.benchmark}, mean of seeds {a.seeds}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
