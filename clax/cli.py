"""The ``clax`` command line.

``clax run --method M --benchmark B [--scenario til|cil] [--seed S] [--epochs E] [--workdir DIR]
[--set key=value ...]`` trains and evaluates one method; ``clax run`` with no method runs every
method on split-digits and prints one comparison table; ``clax list`` prints what exists.
User errors print one line and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable

import numpy as np

from clax.cache import usable_cores

EXIT_USAGE = 2
EXIT_DIVERGED = 3  # training stopped on a NaN or infinite loss


class _Formatter(argparse.HelpFormatter):
    """Help text wrapped at spaces only, so that names such as ``split-tinyimagenet32`` stay whole."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2
        print(f"clax: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def format_matrix(A) -> str:
    """The accuracy matrix as text (rows: after task r; columns: task c)."""
    A = np.asarray([[np.nan if v is None else v for v in row] for row in A], float)
    head = "after\\on " + " ".join(f"{c:>6d}" for c in range(A.shape[1]))
    lines = [head] + [f"{r:>8d} " + " ".join("     -" if np.isnan(v) else f"{v:6.3f}" for v in row)
                      for r, row in enumerate(A)]
    return "\n".join(lines)


#: the line under :func:`format_table`: what its columns hold
TABLE_LEGEND = ("bytes/task: bytes each task stores (mean of results.json params.bytes_per_task); "
                "FWT '-': not reported (CIL: not a transfer, see clax.metrics); backbone: its parameters")


def bytes_per_task(res: dict) -> int:
    """The bytes each task stores in a run: the mean of ``results.json``'s ``params.bytes_per_task``
    (per-task rows plus what the method stores for the task, e.g. PAH's prototypes)."""
    b = res["params"].get("bytes_per_task") or [0]
    return int(round(sum(b) / len(b)))


def format_table(rows: list[dict]) -> str:
    """A comparison table of finished runs (``results.json`` dicts): ACC, BWT, FWT (``-`` where it is
    ``None``), forgetting, bytes stored per task (:func:`bytes_per_task`), the backbone's parameters and
    the training seconds; :data:`TABLE_LEGEND` says so under it."""
    width = max([10] + [len(r["method"]) for r in rows])
    cols = [("method", width, "s"), ("scenario", 8, "s"), ("ACC", 6, ".3f"), ("BWT", 7, "+.3f"),
            ("FWT", 7, "+.3f"), ("forget", 6, ".3f"), ("bytes/task", 10, "d"), ("backbone", 9, "d"),
            ("seconds", 7, ".1f")]
    out = ["  ".join(f"{n:>{w}}" for n, w, _ in cols)]
    for r in rows:
        vals = [r["method"], r["scenario"], r["acc"], r["bwt"], r["fwt"], r["forgetting"],
                bytes_per_task(r), r["params"]["backbone"], r["timing"]["train_s"]]
        out.append("  ".join(f"{_fmt(v, f) if v is None or f != 's' else v:>{w}}"
                             for v, (_, w, f) in zip(vals, cols)))
    return "\n".join(out + [TABLE_LEGEND])


def _run_one(args, method: str, scenario: str | None, workdir: str | None):
    from clax.config import apply_overrides, default_config

    cfg = default_config(method, args.benchmark)
    if scenario:
        cfg["scenario"] = scenario
    cfg["seed"] = args.seed
    if getattr(args, "data_dir", None):
        cfg["data_dir"] = args.data_dir
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        cfg["train"]["epochs"] = args.epochs
    cfg = apply_overrides(cfg, args.set or [])
    load_user_benchmark(cfg)
    from clax.runner import run

    return run(cfg, workdir, progress=not args.quiet, fresh=getattr(args, "fresh", False))


def load_user_benchmark(cfg: dict) -> None:
    """For a user benchmark (``--benchmark package.module:function``), calls the function as the run will
    (:class:`clax.data.UserBenchmark`, which keeps the result for the run) after checking the config, so
    that a function that fails or does not return a Benchmark is a one-line error before the workdir is
    touched. Registered benchmarks are left to the run."""
    from clax.config import validate
    from clax.data import BENCHMARKS, is_reference

    if not is_reference(cfg["benchmark"]):
        return
    validate(cfg)
    from clax.data.pipeline import benchmark_kwargs
    from clax.models import backbone_view

    factory = BENCHMARKS[cfg["benchmark"]]
    factory(seed=cfg["seed"], view=backbone_view(cfg["backbone"]["name"]), **benchmark_kwargs(factory, cfg))


def cmd_run(args) -> int:
    """``clax run``: one method (``--method``), or every method in every scenario it supports with one
    table; names and settings are checked, and a user benchmark loaded, before a workdir is touched."""
    from clax.config import check_benchmark_name, check_method_name, check_name
    from clax.data import SCENARIOS
    from clax.methods import METHODS

    check_benchmark_name(args.benchmark)
    bench_name = args.benchmark.replace(":", ".")  # in a default workdir's name
    if args.scenario:
        check_name("scenario", args.scenario, SCENARIOS)
    if args.method:
        check_method_name(args.method)
        workdir = args.workdir or os.path.join(
            "runs", f"{args.method}-{bench_name}-{args.scenario or 'default'}-s{args.seed}")
        res = _run_one(args, args.method, args.scenario, workdir)
        print(f"\n{res['method']} on {res['benchmark']} ({res['scenario'].upper()}), seed {res['seed']}")
        print(format_matrix(res["accuracy_matrix"]))
        print()
        print(format_table([res]))
        print(f"\nresults: {os.path.join(workdir, 'results.json')}")
        return 0
    # The main job: every method, every scenario it supports, one table.
    root = args.workdir or os.path.join("runs", f"main-{bench_name}-s{args.seed}")
    runs = [(name, scen) for name, spec in METHODS.items()
            for scen in ([args.scenario] if args.scenario else spec.scenarios) if scen in spec.scenarios]
    jobs = default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    jobs = min(jobs, len(schedule(runs)))  # a method's runs share one worker
    t0 = time.perf_counter()
    rows = _run_parallel(args, runs, root, jobs)
    print()
    print(format_table(rows))
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s ({jobs} worker process{'es' if jobs > 1 else ''}); "
          f"workdirs under {root}/")
    return 0


#: the most worker processes the main job starts by default (each holds a JAX runtime, about 1 GB)
MAX_DEFAULT_JOBS = 8


def default_jobs() -> int:
    """The main job's worker processes when ``--jobs`` is not given: one per usable core, at most
    :data:`MAX_DEFAULT_JOBS` (each worker runs on one core, :func:`pin_worker`)."""
    return max(1, min(MAX_DEFAULT_JOBS, len(usable_cores())))


def pin_worker(counter, cores: list[int]) -> None:
    """Initializer of the main job's worker processes: the ``i``-th worker started (``counter``, a shared
    ``multiprocessing.Value``) runs on core ``cores[i % len(cores)]`` alone, set before JAX starts its
    CPU runtime, which sizes its thread pools by the cores it may use: one thread each.

    So workers do not take cores from each other (on 2 cores, 2 workers of 2 threads each spent about a
    tenth more CPU time), and each run's numbers are the same whatever ``--jobs`` and however many
    cores the machine has: XLA's CPU results depend in the last bits on the thread count (a
    ``clax run --method M`` uses every core; ``taskset -c 0 clax run --method M`` gives the main job's
    row). Where the platform cannot pin (no ``os.sched_setaffinity``), workers run unpinned."""
    with counter.get_lock():
        i = counter.value
        counter.value += 1
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores[i % len(cores)]})
    one_blas_thread()


def one_blas_thread() -> None:
    """numpy's BLAS and LAPACK (OpenBLAS) run on one thread in a pinned worker. Their thread pool is
    started with numpy, before :func:`pin_worker` pins the process, so its threads keep every core:
    IBM's per-epoch SVD ratio (``np.linalg.eigvalsh``) waited on a BLAS thread that shared the other
    core with the other worker: 3.6 s of a warm main job's IBM run, 0.33 s on one thread (py-spy)."""
    from threadpoolctl import threadpool_limits  # the library for native thread pools (scikit-learn's too)

    threadpool_limits(1)


def _worker_runs(args, group: list, root: str) -> list:
    """Runs one method's runs (``[(name, scenario)]``) in order in a worker process of the main job:
    the runs of a method share its pretraining and compiled code. Returns their results."""
    out = []
    for name, scen in group:
        t0 = time.perf_counter()
        out.append(_run_one(args, name, scen, os.path.join(root, f"{name}-{scen}")))
        print(f"== {name} ({scen.upper()}) done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


#: the methods whose runs take longest on the main job (pretraining, hypernetworks, masks), started first
HEAVY = ("clr", "soft_tf", "hembed", "hnet", "pah", "ibm", "wsn", "packnet")


#: methods whose runs compile the same programs as another method's (joint: finetune's train and eval
#: steps and init, on more data), so they run after that method's runs in its worker: run at the same
#: time in two workers, both would compile them
SAME_PROGRAMS = {"joint": "finetune"}


def schedule(runs: list) -> dict:
    """The main job's runs ``[(method, scenario)]`` grouped by method (a group runs in one worker, in
    order; a method of :data:`SAME_PROGRAMS` joins its partner's group, after it), the groups in the
    order they are started: the :data:`HEAVY` methods first, in that order, then the others by
    decreasing number of runs (registry order among equals)."""
    groups: dict = {}
    present = {name for name, _ in runs}
    for name, scen in runs:
        key = SAME_PROGRAMS[name] if SAME_PROGRAMS.get(name) in present else name
        groups.setdefault(key, []).append((name, scen))
    for key, group in groups.items():
        group.sort(key=lambda run: run[0] != key)  # the group's own method's runs first (a stable sort)
    order = sorted(groups, key=lambda n: (n not in HEAVY, HEAVY.index(n) if n in HEAVY else -len(groups[n])))
    return {n: groups[n] for n in order}


def _run_parallel(args, runs: list, root: str, jobs: int) -> list:
    """The main job's runs on ``jobs`` worker processes (spawned, so each has its own JAX; each on one
    core, :func:`pin_worker`; ``jobs=1`` too, so that the numbers do not depend on ``jobs``). The runs
    of one method stay in one process, in order; the methods with the most runs and the heaviest
    (frozen backbones, hypernetworks, masks) start first. Results come back in the registry's order;
    a failed run stops the job with its error once the running ones have finished."""
    import concurrent.futures as cf
    import multiprocessing as mp

    groups = schedule(runs)
    if jobs > 1:  # bars from several processes would interleave
        args = argparse.Namespace(**{**vars(args), "quiet": True})
    ctx = mp.get_context("spawn")
    results: dict = {}
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=pin_worker,
                                initargs=(ctx.Value("i", 0), usable_cores())) as pool:
        futures = {pool.submit(_worker_runs, args, group, root): n for n, group in groups.items()}
        for fut in cf.as_completed(futures):
            for (name, scen), res in zip(groups[futures[fut]], fut.result()):
                results[(name, scen)] = res
    return [results[r] for r in runs]


def plain(text: str) -> str:
    """``text`` without reST markup, as a terminal shows it: ``` ``code`` ``` and `` `x` `` lose their
    backticks, ``:func:`~a.b``` becomes ``b`` and ``:class:`a.b``` ``a.b``; whitespace runs become one space."""
    text = re.sub(r":[a-z]+:`~[^`]*?([^.`]+)`", r"\1", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    text = re.sub(r"`+([^`]*)`+", r"\1", text)
    return " ".join(text.split())


def first_line(doc: str | None) -> str:
    """The first line of a docstring, without reST markup (:func:`plain`)."""
    return plain((doc or "").strip().splitlines()[0]) if (doc or "").strip() else ""


def columns(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """``rows`` as lines of left-aligned columns, each as wide as its widest cell (the last one unpadded)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return [indent + "  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)).rstrip()
            for r in rows]


def show_value(v) -> str:
    """A setting's value as ``--set`` takes it: ``true``/``false``, numbers, ``[a, b]`` lists, ``""`` for
    an empty string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v else '""'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def valid_values(rule, default) -> str:
    """What a setting accepts, in words, from its :class:`clax.settings.Rule` (or its default's kind)."""
    from clax.settings import _rule_of_default

    r = rule or _rule_of_default(default)
    if r.kind == "str" and r.says.startswith("one of "):
        return " | ".join(r.says[len("one of "):].split(", "))
    if r.says and r.says[0].isalpha() and not r.says.startswith("in "):
        return r.says
    base = {"int": "integer", "number": "number", "bool": "true | false", "str": "text",
            "ints": "list of integers", "regex": "regular expression"}.get(r.kind, "any")
    return f"{base} {r.says}".strip()


def describe_method(name: str) -> list[str]:
    """``clax list METHOD``'s lines: for each part of ``name`` its summary, scenarios, default backbone,
    training defaults it changes, and every setting with its default, valid values and one line."""
    from clax.config import check_method_name
    from clax.methods import METHODS, parts, setting_help

    check_method_name(name)
    out = []
    for part in parts(name):
        spec = METHODS[part]
        helps = setting_help(part)
        out.append(f"{part}: {plain(spec.summary)}")
        bb = f"default backbone {spec.backbone}" + (
            " (" + ", ".join(f"{k}={show_value(v)}" for k, v in spec.backbone_settings.items()) + ")"
            if spec.backbone_settings else "")
        out.append(f"  scenarios {'/'.join(spec.scenarios)}; {bb}")
        if spec.train:
            out.append("  training defaults it changes (--set train.KEY=VALUE): "
                       + ", ".join(f"{k}={show_value(v)}" for k, v in spec.train.items()))
        if not spec.defaults:
            out.append("  no settings of its own")
            continue
        out.append(f"  settings (--set {part}.KEY=VALUE):")
        rows = [["setting", "default", "valid", "what"]]
        rows += [[k, show_value(v), valid_values(spec.rules.get(k), v), plain(helps.get(k, ""))]
                 for k, v in spec.defaults.items()]
        out += columns(rows, "    ")
    return out


def cmd_list(args) -> int:
    """``clax list [METHOD]``: what exists, or one method's settings."""
    if getattr(args, "method", None):
        print("\n".join(describe_method(args.method)))
        return 0
    from clax.data import BENCHMARKS
    from clax.methods import METHODS
    from clax.models import BACKBONES

    print("methods (clax list METHOD: its settings; join methods with '+', e.g. replay+lwf):")
    print("\n".join(columns([["name", "scenarios", "backbone", "what"]] + [
        [n, "/".join(s.scenarios), s.backbone, plain(s.summary)] for n, s in METHODS.items()])))
    print("benchmarks (--benchmark NAME):")
    print("\n".join(columns([[n, first_line(f.__doc__)] for n, f in BENCHMARKS.items()] + [
        ["package.module:function", "your own: a function returning a clax.data.Benchmark "
                                    "(e.g. Benchmark.from_arrays)"]])))
    print("backbones (--set backbone.name=NAME):")
    print("\n".join(columns([[n, f"{view} input", ", ".join(f"{k}={show_value(v)}" for k, v in d.items())]
                             for n, (_, d, view) in BACKBONES.items()])))
    return 0


#: absl warnings that Orbax prints on every read-only checkpoint manager (resume, inspect, eval) and that
#: tell the user nothing
_NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


def quiet_absl() -> None:
    """Drops the absl warnings in :data:`_NOISE` (idempotent); other absl messages pass."""
    import logging

    log = logging.getLogger("absl")
    if any(getattr(f, "_clax", False) for f in log.filters):
        return

    def keep(record) -> bool:
        return not str(record.getMessage()).startswith(_NOISE)

    keep._clax = True
    log.addFilter(keep)


def _close_bars() -> None:
    """Closes the progress bars still open (a run stopped by an exception), so that the message that
    follows starts on its own line: on a terminal the bar's line is cleared, elsewhere (a log file)
    a newline ends it."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return
    bars = [b for b in list(getattr(tqdm, "_instances", [])) if not getattr(b, "disable", True)]
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot be closed is not worth another error
            pass
    if bars and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        print(file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The ``clax`` command's parser: every option's help says its default and valid values."""
    from clax.data import BENCHMARKS
    from clax.methods import METHODS

    p = _Parser(prog="clax", description="Continual learning in JAX. 'clax COMMAND --help' describes a command.")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser, metavar="COMMAND")
    r = sub.add_parser("run", help="train and evaluate (no --method: every method, one table)",
                       description="Train and evaluate one method (or every method) on a benchmark; the "
                                   "workdir receives results.json, metrics.csv, accuracy_matrix.png and "
                                   "checkpoints, and a rerun of the same command resumes it.")
    r.add_argument("--method", metavar="NAME",
                   help="the method, or several joined with '+' (e.g. replay+lwf); valid: "
                        f"{', '.join(METHODS)}; 'clax list NAME' shows its settings. Default: none, which "
                        "runs every method in every scenario it supports and prints one table")
    r.add_argument("--benchmark", default="split-digits", metavar="NAME",
                   help=f"the task stream: one of {', '.join(BENCHMARKS)}, or your own as "
                        "package.module:function (a function returning a clax.data.Benchmark, importable from "
                        "PYTHONPATH or the current directory). Default: %(default)s")
    r.add_argument("--scenario", metavar="til|cil",
                   help="til (task id given) or cil (class-incremental). Default: the method's first supported "
                        "scenario (see 'clax list'); without --method, every scenario each method supports")
    r.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of parameters, data order and every random draw, an integer >= 0. Default: %(default)s")
    r.add_argument("--epochs", type=int, metavar="N",
                   help="epochs per task, an integer >= 1 (sets train.epochs). Default: the method's "
                        "(5 unless 'clax list METHOD' says otherwise)")
    r.add_argument("--workdir", metavar="DIR",
                   help="where the run is written and resumed from. Default: runs/METHOD-BENCHMARK-SCENARIO-sSEED "
                        "(SCENARIO 'default' without --scenario); without --method, runs/main-BENCHMARK-sSEED "
                        "with one workdir per method and scenario under it")
    r.add_argument("--data-dir", metavar="DIR",
                   help="folder of a real data set (image folder, tiny-imagenet-200, TFDS data dir). Default: "
                        "none (the offline digits benchmarks need none)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. train.lr=1e-3, ewc.lambda=1e4, backbone.name=resnet18; "
                        "repeatable. Keys: train.*, backbone.*, checkpoint.*, METHOD.* ('clax list METHOD' "
                        "lists a method's with defaults and valid values) and the config's other sections; an "
                        "unknown key is refused, naming the valid ones. Default: none")
    r.add_argument("--quiet", action="store_true", help="no progress bars. Default: off (bars on a terminal)")
    r.add_argument("--jobs", type=int, metavar="N",
                   help="without --method: worker processes that run the main job's runs side by side (each "
                        "method's runs stay in one process, in order; each process on one core, so the numbers do "
                        "not depend on N or on the machine), an integer >= 1. Default: one per core, at most 8")
    r.add_argument("--fresh", action="store_true",
                   help="move an existing workdir to WORKDIR.old-N and start over instead of resuming. "
                        "Default: off (resume)")
    from clax.inspect import add_commands

    add_commands(sub)
    # clax plot WORKDIR [WORKDIR ...] [--out DIR]: figures of finished workdirs (clax/plot.py)
    from clax.plot import add_command as add_plot_command

    add_plot_command(sub)
    ls = sub.add_parser("list", help="methods, benchmarks and backbones; 'clax list METHOD': its settings",
                        description="What exists: methods, benchmarks, backbones. With a method, its settings "
                                    "with defaults, valid values and what each does.")
    ls.add_argument("method", nargs="?", metavar="METHOD",
                    help="a method (or several joined with '+') whose settings to list. Default: none, list "
                         "everything")
    return p


def main(argv=None) -> int:
    """Entry point of the ``clax`` command."""
    quiet_absl()
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return EXIT_USAGE
    return guarded({"run": cmd_run, "list": cmd_list}.get(args.cmd, getattr(args, "func", None)), args)


def guarded(fn: Callable[..., int], *args) -> int:
    """``fn(*args)``, with clax's exit codes: a user error (``ValueError``; an ``OSError`` such as a
    file that cannot be read or written) prints one line ``clax: error: ...`` and gives 2, a diverged
    run (:class:`clax.train.NonFiniteLossError`) 3, Ctrl-C 130. Each message starts on its own line
    (open progress bars are closed first). Used by the ``clax`` command and the experiment scripts."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        _close_bars()
        print(f"clax: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        from clax.train import NonFiniteLossError

        if not isinstance(e, NonFiniteLossError):
            raise
        _close_bars()
        print(f"clax: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        _close_bars()
        print("clax: interrupted", file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    """An exception's message on one line (an ``OSError`` as ``strerror: filename``)."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        msg = f"{e.strerror}: {e.filename}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


if __name__ == "__main__":
    sys.exit(main())
