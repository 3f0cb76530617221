"""Shared runner of the parameter-isolation experiment configs (``python experiments/<name>.py``)."""
from __future__ import annotations

import argparse
import json
import sys

from clax.config import apply_overrides, default_config


def base_config(method: str, benchmark: str) -> dict:
    """``default_config(method, benchmark)`` (the registry's defaults, overridden by the caller)."""
    return default_config(method, benchmark)


def main(get_config, argv=None) -> dict:
    """Runs ``get_config()`` with ``--set key=value`` overrides; ``--workdir`` receives the results."""
    p = argparse.ArgumentParser(description=(get_config.__doc__ or "").strip().splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from clax.runner import run

    cfg = apply_overrides(get_config(), args.set)
    res = run(cfg, args.workdir)
    print(json.dumps({k: res.get(k) for k in ("method", "benchmark", "acc", "bwt", "mask_density",
                                              "capacity_used")}, indent=1))
    return res


if __name__ == "__main__":
    sys.exit("run one of the experiment files, e.g. python experiments/ibm_cifar100.py")
