"""Shared entry point of the experiment scripts: ``python experiments/X.py [--workdir DIR] [--set k=v ...]``."""
from __future__ import annotations

import argparse
import json


def main(get_config, argv=None) -> dict:
    """Runs ``get_config()`` with ``--set`` overrides through :func:`clax.runner.run`; prints ACC/BWT."""
    from clax.config import apply_overrides
    from clax.runner import run

    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = apply_overrides(get_config(), args.set)
    res = run(cfg, workdir=args.workdir)
    print(json.dumps({k: res[k] for k in ("method", "benchmark", "acc", "bwt", "forgetting")}))
    return res
