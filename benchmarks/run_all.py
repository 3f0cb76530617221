"""Every ratio of BENCHMARKS.md's performance targets in one run, printed as a table (issue 17, item 6).

Each measurement runs in a fresh process (``--worker NAME``) with the library of ``--code`` (default:
this checkout) first on ``sys.path``, so an old checkout (``git worktree add /tmp/before <commit>``) is
measured by the same scripts: run it once with ``--code /tmp/before --json before.json`` and once here
with ``--before before.json`` to get both columns. Every figure is a ratio of two times taken in the
same process, a few seconds apart (the machines here are shared and noisy); the main job is two runs of
``clax run`` (cold: an empty compilation cache; warm: the same cache, a fresh workdir).

    python benchmarks/run_all.py                                   # everything, this checkout
    python benchmarks/run_all.py --skip main_job torch             # leave out the slow / optional ones
    python benchmarks/run_all.py --torch-python /tmp/torchvenv/bin/python   # PyTorch from another venv
    python benchmarks/run_all.py --before before.json --write BENCHMARKS.md  # replace the table there

``--write FILE`` replaces the text between ``<!-- run_all:begin -->`` and ``<!-- run_all:end -->`` in
FILE with the table, the command and the machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


# ---------------------------------------------------------------- workers (run in a fresh process)

def _interleaved(fns: dict, rounds: int) -> dict:
    """``{name: median seconds}`` of every ``fns[name]()`` called ``rounds`` times, the names interleaved."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def w_pah(a) -> dict:
    """PAH's step at task 2 of a 2-task and of a 20-task stream (item 1)."""
    from pah_step import BLOCKS, measure

    return _interleaved({f"T{T}": (lambda T=T: measure(T, [2], a.iters, "mlp", {}, BLOCKS)[2]) for T in (2, 20)},
                        a.rounds)


def _isolation(a, backbone: str, iters: int) -> dict:
    from isolation_step import step_time

    return _interleaved({m: (lambda m=m: step_time(m, backbone, 8, iters)) for m in ("finetune", "wsn", "ibm")},
                        a.rounds)


def w_isolation_mlp(a) -> dict:
    """finetune, wsn and ibm steps on the MLP (item 2)."""
    return _isolation(a, "mlp", a.iters)


def w_isolation_resnet(a) -> dict:
    """finetune, wsn and ibm steps on ResNet-18 nf=8 (item 2)."""
    return _isolation(a, "resnet18", max(3, a.iters // 5))


def w_steps_vs_tasks(a) -> dict:
    """Each method's step at the 2nd and the 20th task of a 20-task stream (item 3)."""
    from _timing import train_step_seconds
    from steps_vs_tasks import METHODS, build

    out = {}
    for name in METHODS:
        bench, meth, tc = build(name)
        for k in (2, 20):
            out[f"{name}:k{k}"] = statistics.median(
                train_step_seconds(meth, bench, t=k - 1, iters=a.iters, batch_size=tc.batch_size, warmup=3,
                                   begin_task=True, cfg=tc) for _ in range(a.rounds))
    return out


def w_composition(a) -> dict:
    """The composed baselines' steps beside finetune's (issue 13)."""
    from _timing import train_step_seconds
    from composition_step import METHODS, build

    built = {m: build(m) for m in METHODS}
    return _interleaved({m: (lambda m=m: train_step_seconds(built[m][1], built[m][0], t=1, iters=a.iters,
                                                             batch_size=built[m][2].batch_size, warmup=5,
                                                             cfg=built[m][2], begin_task=True))
                         for m in METHODS}, a.rounds)


def w_devices(a) -> dict:
    """The finetune step on 1 and on 8 forced host devices (issue 14; XLA_FLAGS set by the parent)."""
    from devices_step import step_seconds

    return _interleaved({f"d{n}": (lambda n=n: step_seconds(n, "mlp", 8, a.iters, 32)) for n in (1, 8)}, a.rounds)


WORKERS = {"pah": w_pah, "isolation_mlp": w_isolation_mlp, "isolation_resnet": w_isolation_resnet,
           "steps_vs_tasks": w_steps_vs_tasks, "composition": w_composition, "devices": w_devices}


# ---------------------------------------------------------------- the parent

def _worker(name: str, a) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([a.code, HERE])}
    if name == "devices":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--iters", str(a.iters),
           "--rounds", str(a.rounds)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=a.code)
    if res.returncode:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _torch(a) -> dict:
    """The reduced ResNet-18 step in clax (library of ``--code``) and in PyTorch (``--torch-python``)."""
    script = os.path.join(HERE, "step_vs_torch.py")
    env = {**os.environ, "PYTHONPATH": a.code}
    runs = {"clax": [sys.executable, script, "--only", "clax"], "torch": [a.torch_python, script, "--only", "torch"]}
    times = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, cmd in runs.items():
            res = subprocess.run(cmd + ["--iters", str(max(5, a.iters // 3))], env=env, capture_output=True,
                                 text=True, cwd=a.code)
            if res.returncode:
                raise RuntimeError(f"step_vs_torch --only {k} failed:\n{res.stderr[-3000:]}")
            times[k].append(json.loads(res.stdout.strip().splitlines()[-1]))
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0] if isinstance(v[0][f], float)}
           for k, v in times.items()}
    return {**med["clax"], **med["torch"]}


def _main_job(a) -> dict:
    """Wall seconds of the main job (``clax run``), cold (empty compilation cache) then warm."""
    tmp = tempfile.mkdtemp(prefix="clax-run-all-")
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(tmp, "cache"), "PYTHONPATH": a.code}
    out = {}
    try:
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "clax.cli", "run", "--workdir", os.path.join(tmp, label),
                                  "--quiet"], env=env, capture_output=True, text=True, cwd=a.code)
            if res.returncode:
                raise RuntimeError(f"main job ({label}) failed:\n{res.stderr[-3000:]}")
            out[label] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def rows_of(m: dict) -> list[tuple[str, float, str, str]]:
    """``(what, value, unit, target)`` rows from the raw measurements ``m`` (name -> worker output)."""
    rows = []
    if "pah" in m:
        rows.append(("pah: step at task 2, T=20 / T=2 (MLP)", m["pah"]["T20"] / m["pah"]["T2"], "x", "<= 1.2"))
    for key, bb in (("isolation_mlp", "MLP"), ("isolation_resnet", "ResNet-18 nf=8")):
        if key in m:
            r = m[key]
            rows.append((f"wsn step / plain step ({bb})", r["wsn"] / r["finetune"], "x",
                         "<= 2" if bb == "MLP" else ""))
            rows.append((f"ibm step / plain step ({bb})", r["ibm"] / r["finetune"], "x", ""))
    if "steps_vs_tasks" in m:
        r = m["steps_vs_tasks"]
        for name in dict.fromkeys(k.split(":")[0] for k in r):
            rows.append((f"{name}: step at k=20 / k=2 (20-task stream)", r[f"{name}:k20"] / r[f"{name}:k2"], "x", ""))
    if "composition" in m:
        r = m["composition"]
        for name in r:
            if name != "finetune":
                rows.append((f"{name} step / finetune step (split-digits MLP)", r[name] / r["finetune"], "x", ""))
    if "devices" in m:
        rows.append(("finetune step, 8 forced devices / 1 (2 cores)", m["devices"]["d8"] / m["devices"]["d1"], "x", ""))
    if "torch" in m:
        r = m["torch"]
        rows.append(("reduced ResNet-18 train step, clax / PyTorch (CPU)", r["clax_step_s"] / r["torch_step_s"], "x",
                     "<= 1"))
        if "forward_s" in r and "torch_forward_s" in r:
            rows.append(("reduced ResNet-18 forward, clax / PyTorch (CPU)", r["forward_s"] / r["torch_forward_s"],
                         "x", ""))
    if "main_job" in m:
        rows.append(("main job (`clax run`), cold cache", m["main_job"]["cold"], "s", "<= 100"))
        rows.append(("main job (`clax run`), warm cache", m["main_job"]["warm"], "s", "<= 60"))
    return rows


def _met(value: float, target: str) -> str:
    if not target:
        return ""
    return "yes" if value <= float(target.split()[-1]) else "no"


def table(rows: list, before: list | None = None) -> str:
    """The markdown table of ``rows`` (with a "before" column where ``before`` has the same row)."""
    old = {r[0]: r[1] for r in before or []}
    fmt = lambda v, unit: f"{v:.0f} s" if unit == "s" else f"{v:.2f}x"  # noqa: E731
    head = "| measurement | " + ("before | " if before else "") + "now | target | met |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for what, v, unit, target in rows:
        b = (fmt(old[what], unit) if what in old else "-") + " | " if before else ""
        out.append(f"| {what} | {b}**{fmt(v, unit)}** | {target or '-'} | {_met(v, target) or '-'} |")
    return "\n".join(out)


def write_block(path: str, text: str) -> None:
    """Replaces the text between the run_all markers in ``path`` (appends a block when it has none)."""
    doc = open(path).read() if os.path.exists(path) else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", default=ROOT, help="checkout whose clax is measured (default: this one)")
    p.add_argument("--iters", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are kept")
    p.add_argument("--skip", nargs="*", default=[], help="measurements to leave out",
                   choices=[*WORKERS, "torch", "main_job"])
    p.add_argument("--torch-python", default=sys.executable, help="a Python with torch, for the PyTorch line")
    p.add_argument("--json", default="", help="write the raw measurements and rows here")
    p.add_argument("--before", default="", help="a --json file of an earlier run: its rows become a column")
    p.add_argument("--write", default="", help="replace the run_all block of this markdown file")
    p.add_argument("--merge", default="", help="a --json file of an earlier run of this checkout: its measurements "
                                              "fill in those this run skips (e.g. the main job timed apart on an "
                                              "idle machine)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.code = os.path.abspath(a.code)
    if a.worker:
        sys.path[:0] = [a.code, HERE]
        print(json.dumps(WORKERS[a.worker](a)))
        return 0
    m: dict = {}
    for name in [*WORKERS, "torch", "main_job"]:
        if name in a.skip:
            continue
        t0 = time.perf_counter()
        print(f"[run_all] {name} ...", end="", flush=True, file=sys.stderr)
        try:
            m[name] = _torch(a) if name == "torch" else _main_job(a) if name == "main_job" else _worker(name, a)
        except (RuntimeError, FileNotFoundError) as e:
            print(f" failed: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if a.merge:
        earlier = json.load(open(a.merge))
        m = {**earlier["measurements"], **m}
        note_merge = f" Merged with {a.merge}: {earlier['note']}"
    else:
        note_merge = ""
    rows = rows_of(m)
    before = json.load(open(a.before))["rows"] if a.before else None
    text = table(rows, before)
    cmd = "python benchmarks/run_all.py " + " ".join(arg for arg in (argv if argv is not None else sys.argv[1:]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (f"`{cmd.strip()}` on {datetime.date.today()}: {os.cpu_count()} CPU cores, {platform.machine()}, "
            f"load {load:.1f} at the end; {a.rounds} interleaved rounds of {a.iters} steps, medians.{note_merge}")
    print(text)
    print()
    print(note)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"measurements": m, "rows": rows, "note": note}, f, indent=1)
    if a.write:
        write_block(a.write, f"{text}\n\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
