"""The paper protocols on Split-CIFAR-10 at their papers' training budgets, for a GPU (issue 15), and
docs/RESULTS_CIFAR10.md generated from the runs.

The papers report on CIFAR-100, TinyImageNet and larger; the only real data set that a machine here
can carry is CIFAR-10 (``../shared/data/cifar10-images.tar.gz``, the JPEG re-encode). So each
protocol config of ``experiments/`` runs unchanged except for its stream: ``split-cifar10`` (5 tasks
of 2 classes, TIL, classes in label order as every protocol here sets) read from the class folders.
The budgets are the protocols' own (epochs, batch, rate, schedule, backbone width):

* ``pah``: :mod:`pah_cifar100` (reduced ResNet-18 nf=20, AdamW, 15 epochs, batch 64, 10% validation);
* ``finetune`` and ``hnet``: PAH's baselines, with PAH's backbone, data and training settings (hnet
  with its registry defaults otherwise: the PAH paper does not give its baselines' settings);
* ``ibm``: :mod:`ibm_cifar100` (ResNet-18 nf=64, 10 epochs, batch 256: the released budget; see
  docs/PROTOCOLS.md on its pruning);
* ``wsn``: :mod:`wsn_cifar100` (ResNet-18 nf=64, up to 200 epochs a task, plateau schedule, early
  stop below 1e-6, best-validation restore).

Soft-TF, CLR and the H-embedding hypernetwork are not run: the first two need an ImageNet-pretrained
backbone (none can be downloaded here, and one pretrained on CIFAR-10 would have seen the stream), the
third streams CIFAR-100 after CIFAR-10.

    tar -xzf ../shared/data/cifar10-images.tar.gz -C /tmp/cifar10
    python experiments/cifar10_budgets.py --data-dir /tmp/cifar10 --root runs/cifar10-budgets --deadline 540
    python experiments/cifar10_budgets.py --root runs/cifar10-budgets --report-only   # docs/RESULTS_CIFAR10.md

The runs go in parallel (``--jobs``, default: all of them; on a GPU each process takes
``0.9 / jobs`` of its memory). A run still going at ``--deadline`` seconds is stopped and reported as
such, with the tasks it finished. With ``--seeds`` every run goes once per seed (mean ± sample SD in the report).
``--set RUN:KEY=VALUE`` changes one run only (the report lists it beside the budget). Each run writes
``ROOT/<name>-s<seed>/summary.json`` (its figures, the
device, the wall seconds), from which the report is written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUNS = ("pah", "finetune", "hnet", "ibm", "wsn")
DOC = os.path.join(REPO, "docs", "RESULTS_CIFAR10.md")


def config(name: str, data_dir: str) -> dict:
    """The config of run ``name``: its protocol's config with the stream set to split-cifar10."""
    sys.path.insert(0, HERE)
    from clax.config import default_config

    if name in ("pah", "finetune", "hnet"):
        from pah_cifar100 import get_config as pah

        base = pah()
        if name == "pah":
            cfg = base
        else:
            cfg = default_config(name, "split-cifar10")
            cfg["scenario"] = base["scenario"]
            cfg["backbone"] = dict(base["backbone"])
            cfg["data"] = dict(base["data"])
            keep = ("epochs", "batch_size", "eval_batch_size", "val_fraction")
            cfg["train"].update({k: base["train"][k] for k in (keep if name == "hnet" else base["train"])})
    elif name == "ibm":
        from ibm_cifar100 import get_config as cfg_fn

        cfg = cfg_fn()
    elif name == "wsn":
        from wsn_cifar100 import get_config as cfg_fn

        cfg = cfg_fn()
    else:
        raise ValueError(f"unknown run {name!r}; the runs are {', '.join(RUNS)}")
    cfg["benchmark"] = "split-cifar10"
    cfg["data_dir"] = data_dir
    return cfg


def _overrides(name: str, sets: list) -> list:
    """The ``--set`` values that apply to run ``name``: ``KEY=VALUE`` (every run) and ``NAME:KEY=VALUE``."""
    out = []
    for s in sets:
        run, sep, rest = s.partition(":")
        if sep and "=" not in run:
            if run == name:
                out.append(rest)
        else:
            out.append(s)
    return out


def run_one(name: str, data_dir: str, workdir: str, overrides: list) -> dict:
    """Trains run ``name`` in ``workdir`` and writes ``workdir/summary.json``."""
    import jax

    from clax.config import apply_overrides
    from clax.runner import run

    t0 = time.perf_counter()
    r = run(apply_overrides(config(name, data_dir), overrides), workdir=workdir, progress=False)
    dev = jax.devices()[0]
    s = {"run": name, "seed": r["seed"], "method": r["method"], "acc": r["acc"], "bwt": r["bwt"], "forgetting": r["forgetting"],
         "mask_density": r.get("mask_density"), "capacity_used": r.get("capacity_used"),
         "accuracy_matrix": r["accuracy_matrix"], "train_s": r["timing"]["train_s"],
         "wall_s": time.perf_counter() - t0, "device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__,
         "epochs_run": [t.get("epochs") for t in r.get("task_training", [])] or None,
         "budget": {k: r["config"]["train"][k] for k in ("epochs", "batch_size", "optimizer", "lr", "lr_schedule",
                                                         "val_fraction")} | {"backbone": r["config"]["backbone"]},
         "overrides": overrides}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    return s


def _stat(rs: list, key: str, spec: str = ".3f") -> str:
    """Mean over the seeds' runs (last value of per-task lists), with the spread where there are several."""
    vals = [r.get(key)[-1] if isinstance(r.get(key), list) else r.get(key) for r in rs]
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return format(m, spec)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{m:{spec}} ± {sd:{spec}}"


def claims(rows: list) -> list:
    """``[(claim, verdict)]``: the papers' claims that these runs can test, judged from the numbers."""
    by = {}
    for r in rows:
        by.setdefault(r["run"], []).append(r)

    def mean(name, key):
        vals = [(r[key][-1] if isinstance(r[key], list) else r[key]) for r in by.get(name, []) if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out = []
    iso = [n for n in ("ibm", "wsn") if n in by]
    if iso:
        exact = all(r["bwt"] == 0 and r["forgetting"] == 0 for n in iso for r in by[n])
        out.append((f"parameter isolation forgets nothing: BWT and forgetting exactly 0 ({', '.join(iso)})",
                    "holds" if exact else "does not hold: " + ", ".join(f"{n} BWT {mean(n, 'bwt'):.4f}" for n in iso)))
    if all(n in by for n in ("pah", "finetune", "hnet")):
        f = {n: mean(n, "forgetting") for n in ("pah", "finetune", "hnet")}
        ok = f["pah"] < f["finetune"] and f["pah"] < f["hnet"]
        out.append(("PAH forgets less than finetune and hnet (PAH paper, Table 1)",
                    f"{'holds' if ok else 'does not hold here'}: forgetting {f['pah']:.3f} vs {f['finetune']:.3f} and "
                    f"{f['hnet']:.3f}, ACC {mean('pah', 'acc'):.3f} vs {mean('finetune', 'acc'):.3f} and "
                    f"{mean('hnet', 'acc'):.3f}"))
    if "ibm" in by and "wsn" in by:
        d_i, d_w, a_i, a_w = mean("ibm", "mask_density"), mean("wsn", "mask_density"), mean("ibm", "acc"), mean("wsn", "acc")
        fewer = 1 - d_i / d_w
        verdict = ("holds" if fewer >= 0.7 else "holds in part" if fewer > 0 else "does not hold here")
        out.append(("IBM's sub-networks use about 70% fewer parameters than WSN's at near-equal accuracy (IBM paper)",
                    f"{verdict}: density {d_i:.3f} vs {d_w:.3f} ({abs(fewer):.0%} {'sparser' if fewer >= 0 else 'denser'}) at ACC {a_i:.3f} vs {a_w:.3f}; "
                    f"IBM at its released 10-epoch budget"))
    return out


def report(root: str, note: str = "") -> str:
    """docs/RESULTS_CIFAR10.md's text from ``ROOT/*/summary.json`` (and ``ROOT/unfinished.json``)."""
    import glob

    rows = []
    for p in sorted(glob.glob(os.path.join(root, "*", "summary.json"))):
        with open(p) as f:
            rows.append(json.load(f))
    unfinished = {}
    if os.path.exists(os.path.join(root, "unfinished.json")):
        with open(os.path.join(root, "unfinished.json")) as f:
            unfinished = json.load(f)
    devices = sorted({r["device"] for r in rows})
    lines = ["# Paper protocols on Split-CIFAR-10 at their budgets", "",
             "Generated by `experiments/cifar10_budgets.py` from its runs' `summary.json` files; regenerate with",
             "`python experiments/cifar10_budgets.py --root ROOT --report-only`. Stream: `split-cifar10` from the",
             "JPEG re-encode of CIFAR-10 in `../shared/data` (5 tasks of 2 classes, labels in order, TIL: chance "
             "is 0.5). Each run is its protocol config of `experiments/` with only the stream changed; the runs "
             "went in parallel on one device, so `wall s` is a shared device's.", "",
             f"Device: {', '.join(devices) or 'none'}.", "",
             "| run | protocol budget | seeds | ACC | BWT | forgetting | mask density | epochs run per task | "
             "train s | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        rs = [r for r in rows if r["run"] == name]
        if not rs:
            continue
        r = rs[0]
        b = r["budget"]
        bud = (f"{b['backbone']['name']} nf={b['backbone'].get('nf')}, {b['epochs']} ep, batch {b['batch_size']}, "
               f"{b['optimizer']} {b['lr']:g}, {b['lr_schedule']}, val {b['val_fraction']:g}")
        shown = [o for o in r.get("overrides", []) if not o.startswith("seed=")]
        if shown:
            bud += "; " + ", ".join(f"`{o}`" for o in shown)
        ep = ",".join(str(e) for e in r["epochs_run"]) if r.get("epochs_run") else "-"
        seeds = ",".join(str(x.get("seed", 0)) for x in rs)
        lines.append(f"| {name} | {bud} | {seeds} | {_stat(rs, 'acc')} | {_stat(rs, 'bwt')} | "
                     f"{_stat(rs, 'forgetting')} | {_stat(rs, 'mask_density')} | {ep} | {_stat(rs, 'train_s', '.0f')} | "
                     f"{_stat(rs, 'wall_s', '.0f')} |")
    for name, why in unfinished.items():
        lines.append(f"| {name} | not finished: {why} | | | | | | | | |")
    cl = claims(rows)
    if cl:
        lines += ["", "The papers' claims these runs can test (judged by `claims()` from the numbers):", ""]
        lines += [f"- {c}: {v}." for c, v in cl]
    if note:
        lines += ["", note]
    lines += ["", "Not run: Soft-TF and CLR (they need an ImageNet-pretrained backbone, which cannot be downloaded "
              "here; one pretrained on CIFAR-10 would have seen the stream) and the H-embedding hypernetwork (its "
              "stream is CIFAR-10 then CIFAR-100). The papers' own figures are on CIFAR-100 and larger streams "
              "(docs/PROTOCOLS.md); these runs test their claims on a short real-image stream, not their numbers."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The paper protocols on Split-CIFAR-10 at their budgets (a GPU run).")
    p.add_argument("--data-dir", help="CIFAR-10 class folders (train/<class>/*.jpg, test/<class>/*.jpg)")
    p.add_argument("--root", default="runs/cifar10-budgets", help="one workdir per run under this folder")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--jobs", type=int, default=0, help="runs in parallel (0: all)")
    p.add_argument("--deadline", type=float, default=0, help="stop runs still going after this many seconds (0: none)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", action="append", default=[], metavar="[RUN:]KEY=VALUE",
                   help="an override for every run, or with RUN: for that run only (wsn:train.epochs=25)")
    p.add_argument("--report-only", action="store_true", help="write the report from finished runs, train nothing")
    p.add_argument("--write", default=DOC, help="the report's file")
    p.add_argument("--note", default="", help="a paragraph added to the report (e.g. where the runs came from)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        name, _, seed = a.one.rpartition("-s")
        run_one(name, a.data_dir, os.path.join(a.root, a.one), _overrides(name, a.set) + [f"seed={seed}"])
        return 0
    if not a.report_only:
        names = [n.strip() for n in a.runs.split(",") if n.strip()]
        bad = [n for n in names if n not in RUNS]
        if bad:
            p.error(f"--runs: unknown run {bad[0]!r}; the runs are {', '.join(RUNS)}")
        if not a.data_dir or not os.path.isdir(os.path.join(a.data_dir, "train")):
            p.error(f"--data-dir {a.data_dir!r} must hold CIFAR-10's train/<class>/ and test/<class>/ folders "
                    f"(tar -xzf ../shared/data/cifar10-images.tar.gz -C /tmp/cifar10)")
        from clax.config import apply_overrides, validate

        for n in names:  # every config checked before anything starts
            validate(apply_overrides(config(n, a.data_dir), _overrides(n, a.set)))
        names = [f"{n}-s{seed}" for seed in a.seeds for n in names]
        jobs = a.jobs or len(names)
        env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / jobs:.2f}"}
        os.makedirs(a.root, exist_ok=True)
        t0, procs, queue, unfinished = time.time(), {}, list(names), {}
        while queue or procs:
            while queue and len(procs) < jobs:
                n = queue.pop(0)
                log = open(os.path.join(a.root, f"{n}.log"), "w")
                cmd = [sys.executable, os.path.abspath(__file__), "--one", n, "--data-dir", a.data_dir, "--root", a.root]
                procs[n] = subprocess.Popen(cmd + sum((["--set", s] for s in a.set), []), stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
                print(f"started {n}", flush=True)
            for n, pr in list(procs.items()):
                if pr.poll() is not None:
                    print(f"{n}: exit {pr.returncode} after {time.time() - t0:.0f} s", flush=True)
                    if pr.returncode:
                        unfinished[n] = f"exit {pr.returncode} (see {n}.log)"
                    del procs[n]
                elif a.deadline and time.time() - t0 > a.deadline:
                    pr.kill()
                    pr.wait()
                    unfinished[n] = f"stopped at the {a.deadline:.0f} s deadline"
                    print(f"{n}: {unfinished[n]}", flush=True)
                    del procs[n]
            time.sleep(2)
        old = {}
        if os.path.exists(os.path.join(a.root, "unfinished.json")):
            with open(os.path.join(a.root, "unfinished.json")) as f:
                old = json.load(f)
        old = {k: v for k, v in old.items() if not os.path.exists(os.path.join(a.root, k, "summary.json"))}
        with open(os.path.join(a.root, "unfinished.json"), "w") as f:
            json.dump({**old, **unfinished}, f, indent=1)
    text = report(a.root, a.note)
    with open(a.write, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
