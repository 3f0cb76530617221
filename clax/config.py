"""Run configuration as plain nested dicts, with typed ``key=value`` overrides.

A config has the sections ``train`` (:class:`clax.train.TrainConfig`), ``backbone`` (its ``name`` and
that backbone's settings) and one named after the method holding the method's settings, beside the
top-level ``method``, ``benchmark``, ``scenario`` and ``seed``. :func:`apply_overrides` refuses
unknown keys and values of the wrong type, naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Iterable

from clax.data import BENCHMARKS, SCENARIOS
from clax.methods import METHODS
from clax.models import BACKBONES
from clax.train import TrainConfig


class ConfigError(ValueError):
    """A user error in the configuration (unknown name or key, bad value)."""


def check_name(kind: str, name: str, valid: Iterable[str]) -> None:
    valid = sorted(valid)
    if name not in valid:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


def default_config(method: str = "finetune", benchmark: str = "split-digits") -> dict:
    """The default configuration for ``method`` on ``benchmark``."""
    check_name("method", method, METHODS)
    check_name("benchmark", benchmark, BENCHMARKS)
    spec = METHODS[method]
    bb = spec.backbone
    return {
        "method": method,
        "benchmark": benchmark,
        "scenario": spec.scenarios[0],
        "seed": 0,
        "data_dir": "",  # where real data sets live (image folders, TFDS data dir); see clax.data
        "train": {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "seed"} | spec.train,
        "backbone": {"name": bb, **copy.deepcopy(BACKBONES[bb][1]), **copy.deepcopy(spec.backbone_settings)},
        method: copy.deepcopy(spec.defaults),
        "checkpoint": {"every_steps": 0, "keep": 2},
    }


def _parse(key: str, raw: str, default: Any) -> Any:
    kind = type(default).__name__
    try:
        if isinstance(default, bool):
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, tuple)):
            val = json.loads(raw) if raw.strip().startswith("[") else [int(v) for v in raw.split(",") if v]
            if not isinstance(val, list):
                raise ValueError
            return val
        return raw
    except ValueError:
        raise ConfigError(f"bad value for {key}: {raw!r} is not a valid {kind}") from None


def _keys(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Returns ``cfg`` with each ``"dotted.key=value"`` applied (``backbone.name`` first, so that the
    new backbone's own settings can follow)."""
    cfg = copy.deepcopy(cfg)
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        pairs.append((k.strip(), v))
    for k, v in sorted(pairs, key=lambda kv: kv[0] != "backbone.name"):
        if k == "backbone.name":
            check_name("backbone", v, BACKBONES)
            cfg["backbone"] = {"name": v, **copy.deepcopy(BACKBONES[v][1])}
            continue
        *path, leaf = k.split(".")
        node = cfg
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict) or k in (
                "method", "benchmark"):
            valid = [x for x in _keys(cfg) if x not in ("method", "benchmark")]
            raise ConfigError(f"unknown --set key {k!r}; valid keys: {', '.join(valid)}")
        if k == "scenario":
            check_name("scenario", v, SCENARIOS)
        node[leaf] = _parse(k, v, node[leaf])
    return cfg


def train_config(cfg: dict) -> TrainConfig:
    """The :class:`TrainConfig` of a config (its ``seed`` is the config's)."""
    return TrainConfig(**{**cfg["train"], "seed": cfg["seed"]})
