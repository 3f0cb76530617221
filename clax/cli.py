"""The ``clax`` command line.

``clax run --method M --benchmark B [--scenario til|cil] [--seed S] [--epochs E] [--workdir DIR]
[--set key=value ...]`` trains and evaluates one method; ``clax run`` with no method runs every
method on split-digits and prints one comparison table; ``clax list`` prints what exists.
User errors print one line and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import numpy as np

EXIT_USAGE = 2
EXIT_DIVERGED = 3  # training stopped on a NaN or infinite loss


class _Parser(argparse.ArgumentParser):
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


def format_table(rows: list[dict]) -> str:
    """A comparison table of finished runs."""
    cols = [("method", 10, "s"), ("scenario", 8, "s"), ("ACC", 6, ".3f"), ("BWT", 7, "+.3f"),
            ("FWT", 7, "+.3f"), ("forget", 6, ".3f"), ("params/task", 11, "d"), ("backbone", 9, "d"),
            ("seconds", 7, ".1f")]
    out = ["  ".join(f"{n:>{w}}" for n, w, _ in cols)]
    for r in rows:
        vals = [r["method"], r["scenario"], r["acc"], r["bwt"], r["fwt"], r["forgetting"],
                r["params"]["per_task"][0], r["params"]["backbone"], r["timing"]["train_s"]]
        out.append("  ".join(f"{_fmt(v, f) if v is None or f != 's' else v:>{w}}"
                             for v, (_, w, f) in zip(vals, cols)))
    return "\n".join(out)


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
    from clax.runner import run

    return run(cfg, workdir, progress=not args.quiet, fresh=getattr(args, "fresh", False))


def cmd_run(args) -> int:
    from clax.config import check_method_name, check_name
    from clax.data import BENCHMARKS, SCENARIOS
    from clax.methods import METHODS

    check_name("benchmark", args.benchmark, BENCHMARKS)
    if args.scenario:
        check_name("scenario", args.scenario, SCENARIOS)
    if args.method:
        check_method_name(args.method)
        workdir = args.workdir or os.path.join(
            "runs", f"{args.method}-{args.benchmark}-{args.scenario or 'default'}-s{args.seed}")
        res = _run_one(args, args.method, args.scenario, workdir)
        print(f"\n{res['method']} on {res['benchmark']} ({res['scenario'].upper()}), seed {res['seed']}")
        print(format_matrix(res["accuracy_matrix"]))
        print()
        print(format_table([res]))
        print(f"\nresults: {os.path.join(workdir, 'results.json')}")
        return 0
    # The main job: every method, every scenario it supports, one table.
    root = args.workdir or os.path.join("runs", f"main-{args.benchmark}-s{args.seed}")
    rows, t0 = [], time.perf_counter()
    for name, spec in METHODS.items():
        for scen in ([args.scenario] if args.scenario else spec.scenarios):
            if scen not in spec.scenarios:
                continue
            print(f"== {name} ({scen.upper()})", flush=True)
            rows.append(_run_one(args, name, scen, os.path.join(root, f"{name}-{scen}")))
    print()
    print(format_table(rows))
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s; workdirs under {root}/")
    return 0


def cmd_list(args) -> int:
    from clax.data import BENCHMARKS
    from clax.methods import METHODS
    from clax.models import BACKBONES

    print("methods:")
    for n, s in METHODS.items():
        print(f"  {n:<10} {s.summary}  [{'/'.join(s.scenarios)}; default backbone {s.backbone}]")
    print("benchmarks:")
    for n, f in BENCHMARKS.items():
        print(f"  {n:<16} {(f.__doc__ or '').strip().splitlines()[0]}")
    print("backbones:")
    for n, (_, d, view) in BACKBONES.items():
        print(f"  {n:<10} {view} input; settings {d}")
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


def main(argv=None) -> int:
    """Entry point of the ``clax`` command."""
    quiet_absl()
    p = _Parser(prog="clax", description="Continual learning in JAX.")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)
    r = sub.add_parser("run", help="train and evaluate (no --method: every method, one table)")
    r.add_argument("--method")
    r.add_argument("--benchmark", default="split-digits")
    r.add_argument("--scenario")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--epochs", type=int)
    r.add_argument("--workdir")
    r.add_argument("--data-dir", help="folder of a real data set (image folder, tiny-imagenet-200, TFDS data dir)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--fresh", action="store_true",
                   help="move an existing workdir to WORKDIR.old-N and start over instead of resuming")
    from clax.inspect import add_commands

    add_commands(sub)
    # clax plot WORKDIR [WORKDIR ...] [--out DIR]: figures of finished workdirs (clax/plot.py)
    from clax.plot import add_command as add_plot_command

    add_plot_command(sub)
    sub.add_parser("list", help="methods, benchmarks and backbones")
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
