"""Shared entry point of the experiment scripts: ``python experiments/X.py [--workdir DIR] [--set k=v ...]``.

Each experiment is config-as-code: a ``get_config()`` returning a clax config dict (see
:mod:`clax.config`); a variant of a protocol imports its base's ``get_config`` and changes what differs.
"""
from __future__ import annotations

import argparse
import json
import sys
SUMMARY = ("method", "benchmark", "scenario", "acc", "bwt", "forgetting", "mask_density", "capacity_used")


def main(get_config, argv=None) -> dict:
    """Runs ``get_config()`` with ``--set key=value`` overrides through :func:`clax.runner.run` (results
    in ``--workdir``) and prints the summary figures it has (ACC, BWT, forgetting, mask density...).

    Bad settings or data exit as the ``clax`` command does: one line on stderr, exit status 2.
    """
    from clax.cli import guarded
    from clax.config import apply_overrides
    from clax.runner import run

    p = argparse.ArgumentParser(description=(get_config.__doc__ or "").strip().splitlines()[0] or None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    out = {}

    def go() -> int:
        out.update(run(apply_overrides(get_config(), args.set), workdir=args.workdir))
        print(json.dumps({k: out[k] for k in SUMMARY if k in out}, indent=1))
        return 0

    code = guarded(go)
    if code:
        sys.exit(code)
    return out
