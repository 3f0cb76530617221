"""Every method on Tiny-ImageNet 32x32 (``split-tinyimagenet32``: 10 tasks of 20 classes), and
docs/RESULTS.md generated from the runs' ``results.json`` files (issue 15, item 5).

    # run the grid (resumable: a rerun skips finished runs and resumes unfinished ones), then write the doc
    python experiments/results_tinyimagenet32.py --root runs/results-tin32 --jobs 2
    # regenerate docs/RESULTS.md from finished runs, training nothing
    python experiments/results_tinyimagenet32.py --root runs/results-tin32 --report-only

The data: ``tar -xzf ../shared/data/tiny-imagenet-200-32px.tar.gz -C /tmp/tin32`` and ``tar -xzf
../shared/data/cifar10-images.tar.gz -C /tmp/cifar10`` (the script does both when the folders are
missing and the tarballs are at hand). The images are the 32x32 re-encode of Tiny-ImageNet, not the
64x64 benchmark that papers report on: every figure is labelled "Tiny-ImageNet 32x32".

The grid (:func:`grid`): every method of ``clax list`` in TIL, and in CIL where the method supports
it, on a reduced ResNet-18 (``backbone.name=resnet18``, CIFAR stem, width :data:`BUDGET` ``nf``); Soft-TF
on its small ViT; the frozen-backbone methods (CLR, Soft-TF) on backbones pretrained on CIFAR-10
(``<method>.pretrained=cifar10``), pretrained once per backbone into ``ROOT/pretrain`` and reused. Every
run uses the same budget (:data:`BUDGET`: images per class, epochs, batch) and otherwise its method's
defaults (``clax list METHOD``). One workdir per run, ``ROOT/<method>-<scenario>-s<seed>``; the wall
seconds of each finished run (its attempts added up: a killed run resumes) are kept in
``ROOT/wall_seconds.json``, failures in ``ROOT/failures.json``, and the grid's wall time (its sessions
added up, updated after every run) in ``ROOT/grid_wall.json``.

The report (:func:`report`): one table row per method and scenario (mean and spread over the seeds
found), then the papers' claims that such a run can test, each judged from the numbers by
:func:`claims` ("holds", "holds in part", "does not hold here" or "not tested: ..." where runs are
missing), never written by hand.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import math
import os
import subprocess
import sys
import tarfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

BENCHMARK = "split-tinyimagenet32"
LABEL = "Tiny-ImageNet 32x32"
#: the budget of every run: training images per class (of 500), epochs per task, batch size, the
#: ResNet-18's width (nf), and the steps of the CIFAR-10 pretraining of the frozen backbones
BUDGET = {"per_class": 50, "epochs": 1, "batch": 32, "nf": 8, "pretrain_steps": 1000}
#: methods that freeze a pretrained backbone (pretrained on CIFAR-10 here)
FROZEN = ("clr", "soft_tf")
#: methods whose BWT must be exactly 0 in TIL (parameter isolation; SPEC.md)
ISOLATION = ("wsn", "packnet", "ibm", "clr", "soft_tf")
#: the heaviest runs start first (the workers then finish together)
HEAVY = ("joint", "pah", "hembed", "hnet", "clr", "soft_tf", "derpp", "replay", "packnet", "wsn", "ibm", "ewc", "lwf")
#: the absolute ACC gap within which two runs count as "near equal ACC" (IBM against WSN)
ACC_TOL = 0.02
#: CLR's paper: a task adds under 0.6% of the backbone
CLR_PAPER_FRACTION = 0.006
#: IBM's paper: 70% fewer sub-network parameters than WSN
IBM_PAPER_REDUCTION = 0.70
DOC = os.path.join(REPO, "docs", "RESULTS.md")
COMMAND = "python experiments/results_tinyimagenet32.py --root runs/results-tin32 --jobs 2"


def grid(seeds=(0,), more_seeds=(), more_methods=()) -> list[tuple[str, str, int]]:
    """The runs ``(method, scenario, seed)``: every registered method in each scenario it supports,
    with ``seeds``; the methods in ``more_methods`` also with ``more_seeds``."""
    from clax.methods import METHODS

    out = []
    for name, spec in METHODS.items():
        for scen in ("til", "cil"):
            if scen not in spec.scenarios:
                continue
            for s in list(seeds) + [s for s in more_seeds if name in more_methods and s not in seeds]:
                out.append((name, scen, s))
    return out


def run_name(method: str, scenario: str, seed: int) -> str:
    """A run's workdir name under the root: ``<method>-<scenario>-s<seed>``."""
    return f"{method}-{scenario}-s{seed}"


def overrides(method: str, scenario: str, seed: int, root: str, data_dir: str, cifar_dir: str,
              budget: dict | None = None) -> list[str]:
    """The ``clax run`` arguments of one run of the grid (see the module docstring)."""
    b = {**BUDGET, **(budget or {})}
    args = ["--method", method, "--benchmark", BENCHMARK, "--scenario", scenario, "--seed", str(seed),
            "--data-dir", data_dir, "--epochs", str(b["epochs"]), "--quiet",
            "--set", f"data.per_class={b['per_class']}", "--set", f"train.batch_size={b['batch']}",
            "--set", "log.tensorboard=false"]
    if method != "soft_tf":  # Soft-TF keeps its ViT
        args += ["--set", "backbone.name=resnet18", "--set", f"backbone.nf={b['nf']}", "--set", "backbone.stem=cifar"]
    if method == "packnet":  # prune after all but the last epoch, which retrains
        args += ["--set", f"packnet.prune_after={max(1, b['epochs'] - 1)}"]
    if method in FROZEN:
        args += ["--set", f"{method}.pretrained=cifar10", "--set", f"{method}.pretrain_data_dir={cifar_dir}",
                 "--set", f"{method}.pretrain_steps={b['pretrain_steps']}",
                 "--set", f"{method}.pretrain_dir={os.path.abspath(os.path.join(root, 'pretrain'))}"]
    return args


def _extract(path: str, tarball: str, into: str) -> None:
    if os.path.isdir(path) or not os.path.exists(tarball):
        return
    os.makedirs(into, exist_ok=True)
    print(f"extracting {tarball} into {into}", flush=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(into, filter="data")


def _load_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _save_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_grid(root: str, runs: list, data_dir: str, cifar_dir: str, jobs: int = 2, budget: dict | None = None,
             fresh: tuple = ()) -> dict:
    """Runs ``runs`` (``(method, scenario, seed)``) with ``jobs`` worker processes, each run a
    ``clax run`` process of its own (log in ``ROOT/logs/``), the heaviest first; a frozen-backbone
    method's runs go to one worker, in order, so its backbone is pretrained once. A run whose
    ``results.json`` exists is skipped; the runs named in ``fresh`` start over (``clax run --fresh``:
    the old workdir moves aside), e.g. after clax changed under a half-finished run (a workdir of
    another config is refused on resume). Returns
    ``{"wall": {run: seconds}, "failures": {run: last lines of its log}}`` (also written under ``root``)."""
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    wall_path, fail_path = os.path.join(root, "wall_seconds.json"), os.path.join(root, "failures.json")
    spent_path = os.path.join(root, "attempt_seconds.json")  # every attempt's seconds, a resumed run's added up
    wall, failures, spent = _load_json(wall_path, {}), _load_json(fail_path, {}), _load_json(spent_path, {})
    grid_path = os.path.join(root, "grid_wall.json")
    before, t_start = _load_json(grid_path, {}).get("seconds", 0.0), time.perf_counter()
    lock = threading.Lock()
    units: dict = {}  # a frozen method's runs share one worker (its pretraining); every other run is its own unit
    for m, s, seed in runs:
        units.setdefault(m if m in FROZEN else (m, s, seed), []).append((m, s, seed))
    order = sorted(units, key=lambda u: (HEAVY.index(units[u][0][0]) if units[u][0][0] in HEAVY else len(HEAVY),
                                         units[u][0][1] != "til", units[u][0][2]))
    cmd0 = [sys.executable, "-c", "import sys; from clax.cli import main; sys.exit(main(sys.argv[1:]))", "run"]

    def work(group):
        for m, s, seed in group:
            name = run_name(m, s, seed)
            wd = os.path.join(root, name)
            if os.path.exists(os.path.join(wd, "results.json")):
                print(f"== {name}: finished before, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            log = os.path.join(root, "logs", name + ".log")
            with open(log, "a") as f:
                rc = subprocess.call(cmd0 + overrides(m, s, seed, root, data_dir, cifar_dir, budget) + ["--workdir", wd]
                                     + (["--fresh"] if name in fresh else []),
                                     stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
            dt = time.perf_counter() - t0
            with lock:
                spent[name] = round(spent.get(name, 0.0) + dt, 1)
                _save_json(spent_path, spent)
                _save_json(grid_path, {"seconds": round(before + time.perf_counter() - t_start, 1), "jobs": jobs})
                if rc == 0:
                    wall[name] = spent[name]
                    failures.pop(name, None)
                else:
                    with open(log) as f:
                        failures[name] = {"exit": rc, "log_tail": f.read()[-2000:]}
                _save_json(wall_path, wall)
                _save_json(fail_path, failures)
            print(f"== {name}: {'done' if rc == 0 else f'FAILED (exit {rc}, {log})'} in {dt:.0f} s", flush=True)

    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, [units[u] for u in order]))
    return {"wall": wall, "failures": failures}


# ----------------------------------------------------------------------------------------------- report

def load_runs(root: str) -> list[dict]:
    """Every finished run under ``root`` (``ROOT/*/results.json``), with ``wall_s`` from
    ``ROOT/wall_seconds.json`` where it is there."""
    wall = _load_json(os.path.join(root, "wall_seconds.json"), {})
    out = []
    for p in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
        r = _load_json(p, None)
        if r is None:
            continue
        r["wall_s"] = wall.get(os.path.basename(os.path.dirname(p)))
        out.append(r)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, scenario): the means over its seeds of ACC, BWT, forgetting, FWT, the mean
    mask density over tasks (``mask_density``) and the final consolidated capacity
    (``capacity_used[-1]``) where the method reports them, the bytes stored per task, the backbone's
    parameters, the training and wall seconds per run, the seeds, and the spreads (``*_sd``, sample
    standard deviation; None with one seed). Rows in the order methods register, TIL before CIL."""
    from clax.cli import bytes_per_task

    try:
        from clax.methods import METHODS
        rank = {m: i for i, m in enumerate(METHODS)}
    except ImportError:  # pragma: no cover
        rank = {}
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["scenario"]), []).append(r)
    rows = []
    for (m, s), rs in groups.items():
        dens = [_mean(r["mask_density"]) for r in rs if r.get("mask_density")]
        cap = [r["capacity_used"][-1] for r in rs if r.get("capacity_used")]
        row = {"method": m, "scenario": s, "seeds": sorted(r["seed"] for r in rs), "n": len(rs),
               "backbone": rs[0]["params"]["backbone"],
               "bytes_per_task": _mean([bytes_per_task(r) for r in rs]),
               "train_s": _mean([r["timing"]["train_s"] for r in rs]),
               "wall_s": _mean([r.get("wall_s") for r in rs]),
               "mask_density": _mean(dens), "capacity": _mean(cap)}
        for k in ("acc", "bwt", "forgetting", "fwt"):
            row[k] = _mean([r[k] for r in rs])
            row[k + "_sd"] = _sd([r[k] for r in rs])
        row["bwt_max_abs"] = max(abs(r["bwt"]) for r in rs)
        rows.append(row)
    rows.sort(key=lambda r: (rank.get(r["method"], len(rank)), r["scenario"] != "til", r["scenario"]))
    return rows


def _f(v, spec=".3f", sd=None):
    if v is None:
        return "-"
    return format(v, spec) + (f" ± {sd:.3f}" if sd is not None else "")


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`summarize`'s rows."""
    head = ["method", "scenario", "ACC", "BWT", "forgetting", "FWT", "mask density", "capacity",
            "bytes/task", "backbone params", "train s", "wall s", "seeds"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["scenario"].upper(), _f(r["acc"], ".3f", r["acc_sd"]),
                 _f(r["bwt"], "+.3f", r["bwt_sd"]), _f(r["forgetting"], ".3f", r["forgetting_sd"]),
                 _f(r["fwt"], "+.3f", r["fwt_sd"]), _f(r["mask_density"]), _f(r["capacity"]),
                 _f(r["bytes_per_task"], ",.0f"), f"{r['backbone']:,}", _f(r["train_s"], ".0f"),
                 _f(r["wall_s"], ".0f"), str(r["n"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _row(rows, method, scenario="til"):
    for r in rows:
        if r["method"] == method and r["scenario"] == scenario:
            return r
    return None


def _missing(rows, *needed):
    """The verdict of a claim whose runs (``(method, scenario)``) are not all there, naming those missing."""
    gone = [f"{m} {s.upper()}" for m, s in needed if _row(rows, m, s) is None]
    return {"verdict": "not tested", "text": f"not tested: no finished run of {', '.join(gone) or 'the runs it needs'}"}


def claims(rows: list[dict]) -> list[dict]:
    """The papers' claims this grid can test, each ``{"claim", "verdict", "text"}`` with the verdict
    computed from ``rows`` (:func:`summarize`): ``holds``, ``holds in part``, ``does not hold here`` or
    ``not tested`` (a run it needs is missing). The text gives the numbers the verdict rests on."""
    out = []

    def add(claim, res):
        out.append({"claim": claim, **res})

    # 1. parameter isolation: BWT exactly 0 (every seed)
    for m in ISOLATION:
        r = _row(rows, m)
        c = f"{m} (TIL) is parameter isolation: BWT exactly 0"
        if r is None:
            add(c, _missing(rows, (m, "til")))
            continue
        ok = r["bwt_max_abs"] == 0.0
        add(c, {"verdict": "holds" if ok else "does not hold here",
                "text": (f"BWT {r['bwt']:+.4f} (largest abs(BWT) over {r['n']} seed(s): {r['bwt_max_abs']:.2g})"
                         + ("" if ok else ": earlier tasks' accuracy changed after they were trained"))})

    # 2. IBM: sparser masks than WSN (paper: 70% fewer sub-network parameters) at (near) equal ACC
    c = f"IBM's masks are sparser than WSN's (paper: {IBM_PAPER_REDUCTION:.0%} fewer parameters) at (near) equal ACC"
    ibm, wsn = _row(rows, "ibm"), _row(rows, "wsn")
    if ibm is None or wsn is None or ibm["mask_density"] is None or wsn["mask_density"] is None:
        add(c, _missing(rows, ("ibm", "til"), ("wsn", "til")))
    else:
        red = 1 - ibm["mask_density"] / wsn["mask_density"] if wsn["mask_density"] else 0.0
        near = ibm["acc"] >= wsn["acc"] - ACC_TOL
        nums = (f"mask density IBM {ibm['mask_density']:.3f} vs WSN {wsn['mask_density']:.3f} "
                f"({red:+.0%} fewer), ACC IBM {ibm['acc']:.3f} vs WSN {wsn['acc']:.3f}")
        if red >= IBM_PAPER_REDUCTION and near:
            v = "holds"
        elif red > 0 and near:
            v, nums = "holds in part", nums + f": sparser, but less than the paper's {IBM_PAPER_REDUCTION:.0%}"
        else:
            v = "does not hold here"
            nums += (": IBM's masks are not sparser" if red <= 0 else "") + \
                ("" if near else f"{';' if red <= 0 else ':'} IBM's ACC is more than {ACC_TOL} below WSN's")
        add(c, {"verdict": v, "text": nums})

    # 3. PAH forgets less than finetune and hnet
    c = "PAH forgets less than fine-tuning and HNET (TIL)"
    pah, ft, hnet = _row(rows, "pah"), _row(rows, "finetune"), _row(rows, "hnet")
    if pah is None or ft is None or hnet is None:
        add(c, _missing(rows, ("pah", "til"), ("finetune", "til"), ("hnet", "til")))
    else:
        below = [n for n, r in (("finetune", ft), ("hnet", hnet)) if pah["forgetting"] < r["forgetting"]]
        v = "holds" if len(below) == 2 else ("holds in part" if below else "does not hold here")
        add(c, {"verdict": v, "text": (f"forgetting PAH {pah['forgetting']:.3f}, finetune {ft['forgetting']:.3f}, "
                                       f"hnet {hnet['forgetting']:.3f}" + ("" if v == "holds" else
                                       f": lower than {' and '.join(below) if below else 'neither'}"))})

    # 4. hembed beats hnet (TIL ACC)
    c = "H-embedding guidance improves on HNET (TIL ACC)"
    he = _row(rows, "hembed")
    if he is None or hnet is None:
        add(c, _missing(rows, ("hembed", "til"), ("hnet", "til")))
    else:
        v = "holds" if he["acc"] > hnet["acc"] else "does not hold here"
        add(c, {"verdict": v, "text": f"ACC hembed {he['acc']:.3f} vs hnet {hnet['acc']:.3f} "
                                      f"(forgetting {he['forgetting']:.3f} vs {hnet['forgetting']:.3f})"})

    # 5. frozen-backbone methods beat fine-tuning
    for m, name in (("clr", "CLR"), ("soft_tf", "Soft-TF")):
        for s in ("til", "cil"):
            r, f = _row(rows, m, s), _row(rows, "finetune", s)
            if r is None and s == "cil":
                continue  # the method has no CIL
            c = f"{name} beats fine-tuning ({s.upper()} ACC)"
            if r is None or f is None:
                add(c, _missing(rows, (m, s), ("finetune", s)))
                continue
            v = "holds" if r["acc"] > f["acc"] else "does not hold here"
            add(c, {"verdict": v, "text": f"ACC {m} {r['acc']:.3f} vs finetune {f['acc']:.3f} "
                                          f"(BWT {r['bwt']:+.3f} vs {f['bwt']:+.3f})"})

    # 6. per-task bytes: CLR under 0.6% of the backbone
    c = f"CLR adds under {CLR_PAPER_FRACTION:.1%} of the backbone per task"
    clr = _row(rows, "clr")
    if clr is None:
        add(c, _missing(rows, ("clr", "til")))
    else:
        frac = clr["bytes_per_task"] / (4 * clr["backbone"])
        add(c, {"verdict": "holds" if frac < CLR_PAPER_FRACTION else "does not hold here",
                "text": f"{clr['bytes_per_task']:,.0f} bytes per task = {frac:.2%} of the float32 backbone "
                        f"({clr['backbone']:,} parameters)" + ("" if frac < CLR_PAPER_FRACTION else
                        "; a task's depthwise kernels and BatchNorm grow with the width, the backbone with its "
                        "square, so the share is larger on a narrow ResNet than on the paper's")})
    # 7. what each method stores per task, against the backbone (a measurement, no paper figure to test)
    til = sorted((r for r in rows if r["scenario"] == "til"), key=lambda r: r["bytes_per_task"] / r["backbone"])
    if til:
        add("Bytes stored per task, as a share of the float32 backbone (TIL)",
            {"verdict": "measured", "text": ", ".join(f"{r['method']} {r['bytes_per_task'] / (4 * r['backbone']):.1%}"
                                                      for r in til)})
    return out


def claims_md(cl: list[dict]) -> str:
    """The claims as a markdown table: claim | verdict | the numbers."""
    out = ["| claim | verdict | numbers |", "|---|---|---|"]
    out += [f"| {c['claim']} | **{c['verdict']}** | {c['text'].replace('|', '&#124;')} |" for c in cl]
    return "\n".join(out)


def budget_from_runs(runs: list[dict]) -> dict:
    """The budget the runs were made with, read from their configs (the most common value of each)."""
    from collections import Counter

    def common(f):
        vals = [f(r["config"]) for r in runs]
        vals = [v for v in vals if v is not None]
        return Counter(vals).most_common(1)[0][0] if vals else None

    return {"per_class": common(lambda c: c["data"]["per_class"]),
            "epochs": common(lambda c: c["train"]["epochs"]),
            "batch": common(lambda c: c["train"]["batch_size"]),
            "nf": common(lambda c: c["backbone"].get("nf") if c["backbone"]["name"] == "resnet18" else None)}


def pretrain_line(r: dict) -> str:
    """One run's frozen-backbone pretraining (``results.json`` ``pretrain``) in words."""
    p = r["pretrain"]
    bb = r["config"]["backbone"]
    what = f"{r['method']} ({bb['name']}" + (f" nf {bb['nf']}" if "nf" in bb else "") + ")"
    if p.get("heldout_accuracy") is None:
        return f"{what}: {p.get('source', 'unknown source')}"
    return (f"{what}: {p.get('source', 'CIFAR-10')} {p.get('steps')} steps ({p.get('epochs')} epochs, batch "
            f"{p.get('batch_size')}), held-out accuracy {p['heldout_accuracy']:.3f} on {p.get('heldout_samples')} "
            f"CIFAR-10 test images, {p.get('seconds')} s")


def report(root: str, failures: dict | None = None, total_wall: float | None = None, jobs: int | None = None) -> str:
    """The text of docs/RESULTS.md from the runs under ``root`` (see the module docstring)."""
    runs = load_runs(root)
    failures = _load_json(os.path.join(root, "failures.json"), {}) if failures is None else failures
    rows = summarize(runs)
    b = budget_from_runs(runs) if runs else dict(BUDGET)
    pre = sorted({pretrain_line(r) for r in runs if isinstance(r.get("pretrain"), dict)})
    vits = [r["config"]["backbone"] for r in runs if r["config"]["backbone"]["name"] == "vit"]
    vit = ", ".join(f"{k} {v}" for k, v in vits[0].items() if k in ("patch", "dim", "depth", "heads")) if vits else "-"
    seeds = {f"{r['method']} {r['scenario'].upper()}": r["n"] for r in rows}
    multi = [k for k, n in seeds.items() if n > 1]
    lines = [
        f"# Results on {LABEL}",
        "",
        "Generated by `experiments/results_tinyimagenet32.py` from the runs' `results.json` files; do not edit "
        "by hand. Regenerate with",
        "",
        "```bash",
        "tar -xzf ../shared/data/tiny-imagenet-200-32px.tar.gz -C /tmp/tin32   # the data (the script does this too)",
        "tar -xzf ../shared/data/cifar10-images.tar.gz -C /tmp/cifar10",
        COMMAND + "              # run (resumes; skips finished runs)",
        "python experiments/results_tinyimagenet32.py --root runs/results-tin32 --report-only    # this file only",
        "```",
        "",
        f"**Data.** `{BENCHMARK}`: {LABEL}, 200 classes in 10 tasks of 20, the 32x32 re-encode of Tiny-ImageNet "
        "(../shared/data). It is *not* the 64x64 benchmark that papers report on: no figure here is comparable "
        "to a paper's Tiny-ImageNet figure.",
        "",
        f"**Budget** (2-core CPU): {b['per_class']} training images per class (of 500; the full 50 test images "
        f"per class), {b['epochs']} epoch{'s' if b['epochs'] != 1 else ''} per task, batch {b['batch']}; reduced "
        f"ResNet-18 (CIFAR stem, nf {b['nf']}" + (f", narrower than nf 20 for the time budget: nf 20 would cost "
        f"about {(20 / b['nf']) ** 2:.0f}x the compute" if b["nf"] and b["nf"] < 20 else "") + ") for every "
        f"method but Soft-TF (its small ViT: {vit}); CLR and Soft-TF freeze backbones pretrained on "
        "CIFAR-10 (`<method>.pretrained=cifar10`, "
        f"{BUDGET['pretrain_steps']} steps, pretrained once and reused). Every other setting is the method's "
        "default (`clax list METHOD`). At this budget every method is far from its paper's accuracy; the "
        "figures compare methods under one small, equal budget.",
        "",
        "**Pretraining** (`results.json` `pretrain`): " + ("; ".join(pre) if pre else "none found") + ".",
        "",
        "**Seeds.** " + (f"{'; '.join(f'{k}: {seeds[k]} seeds' for k in multi)} (mean ± sample sd); every other "
                         "row 1 seed." if multi else "every row 1 seed (seed "
                         f"{', '.join(str(x) for x in sorted({x for r in rows for x in r['seeds']}))})."),
        "",
        f"**Time.** `train s`: training seconds of a run (`results.json` `timing.train_s`; evaluation after "
        f"each task excluded); `wall s`: the whole run as the script measured it (data, compilation, "
        f"evaluation, checkpoints), each run beside one other on the 2 cores."
        + (f" The grid took {total_wall / 60:.0f} minutes of wall time with {jobs} worker processes."
           if total_wall else ""),
        "",
        f"## {LABEL}: every method",
        "",
        table(rows),
        "",
        "ACC, BWT, forgetting, FWT as in SPEC.md (FWT '-' in CIL: not a transfer there, see clax.metrics). "
        "mask density: the mean over tasks of the fraction of masked weights a task's mask keeps; capacity: "
        "the fraction consolidated after the last task (wsn, packnet, ibm). bytes/task: the mean of "
        "`params.bytes_per_task`.",
        "",
        f"## The papers' claims at this scale ({LABEL})",
        "",
        "Each verdict is computed by the script from the table's numbers (`claims()`), with a tolerance of "
        f"{ACC_TOL} ACC for \"near equal\". \"does not hold here\" is about this small budget, not the paper's.",
        "",
        claims_md(claims(rows)),
    ]
    done = {run_name(r["method"], r["scenario"], r["seed"]) for r in runs}
    todo = [run_name(*g) for g in grid() if run_name(*g) not in done]
    if todo:
        lines[lines.index(f"## {LABEL}: every method") - 2] += (
            f" Not finished when this file was generated: {', '.join(todo)} (the times above are for the "
            "runs finished so far).")
    if failures:
        lines += ["", "## Runs that failed", "", "The last line of each run's log (`ROOT/logs/RUN.log`); this script's "
                  "`--fresh RUN ...` starts a run over.", ""]
        lines += [f"- `{k}`: exit {v.get('exit')}: `{((v.get('log_tail') or '').strip().splitlines() or [''])[-1]}`"
                  for k, v in sorted(failures.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Runs the grid (unless ``--report-only``) and writes docs/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.path.join(REPO, "runs", "results-tin32"), help="where the runs' workdirs go")
    p.add_argument("--data-dir", default="/tmp/tin32/tiny-imagenet-200", help="the tiny-imagenet-200 32px folder")
    p.add_argument("--cifar10-dir", default="/tmp/cifar10", help="the CIFAR-10 class folder (frozen backbones)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (worker processes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every run")
    p.add_argument("--more-seeds", type=int, nargs="*", default=[], help="extra seeds, for --more-methods only")
    p.add_argument("--more-methods", nargs="*", default=[], help="methods that also run --more-seeds")
    p.add_argument("--only", nargs="*", default=None, help="run only these methods")
    p.add_argument("--fresh", nargs="*", default=[], metavar="RUN",
                   help="runs (e.g. hnet-til-s0) to start over instead of resuming")
    p.add_argument("--report-only", action="store_true", help="write the doc from finished runs; train nothing")
    p.add_argument("--out", default=DOC, help="the generated markdown file")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if not a.report_only:
        _extract(a.data_dir, os.path.join(SHARED, "tiny-imagenet-200-32px.tar.gz"), os.path.dirname(a.data_dir))
        _extract(os.path.join(a.cifar10_dir, "train"), os.path.join(SHARED, "cifar10-images.tar.gz"), a.cifar10_dir)
        for d, what in ((a.data_dir, "--data-dir"), (os.path.join(a.cifar10_dir, "train"), "--cifar10-dir")):
            if not os.path.isdir(d):
                print(f"results_tinyimagenet32: {what}: no folder {d}", file=sys.stderr)
                return 2
        runs = grid(a.seeds, a.more_seeds, a.more_methods)
        if a.only:
            runs = [r for r in runs if r[0] in a.only]
        os.makedirs(a.root, exist_ok=True)
        run_grid(a.root, runs, os.path.abspath(a.data_dir), os.path.abspath(a.cifar10_dir), a.jobs, fresh=tuple(a.fresh))
    g = _load_json(os.path.join(a.root, "grid_wall.json"), {})
    text = report(a.root, total_wall=g.get("seconds"), jobs=g.get("jobs"))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
