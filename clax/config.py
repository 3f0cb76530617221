"""Run configuration as plain nested dicts, with typed ``key=value`` overrides.

A config has the sections ``train`` (:class:`clax.train.TrainConfig`), ``backbone`` (its ``name`` and
that backbone's settings), ``checkpoint`` and one named after the method holding the method's settings,
beside the top-level ``method``, ``benchmark``, ``scenario``, ``seed`` and ``data_dir``.
:func:`apply_overrides` refuses unknown keys and values of the wrong type, naming the key;
:func:`validate` checks every value's type and range without loading data or building anything, and
:func:`check_workdir` that a workdir can be written (and moved aside) before a run touches it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Iterable

from clax.data import BENCHMARKS, SCENARIOS, is_reference
from clax.data.pipeline import DATA_DEFAULTS, benchmark_kwargs, data_kwargs
from clax.mesh import MESH_DEFAULTS
from clax.methods import METHODS, check_method_settings, check_scenario_of, method_settings, parts, spec_of
from clax.models import BACKBONES, check_backbone_settings
from clax.settings import NON_NEGATIVE_INT, POSITIVE_INT, REGEX, check_settings, check_value
from clax.train import TrainConfig


class ConfigError(ValueError):
    """A user error in the configuration (unknown name or key, bad value)."""


def check_name(kind: str, name: str, valid: Iterable[str]) -> None:
    """Raises :class:`ConfigError` when ``name`` is not one of ``valid``, listing them."""
    valid = sorted(valid)
    if name not in valid:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


def check_benchmark_name(name: str) -> None:
    """Checks a benchmark name: a registered one, or a user's ``package.module:function`` whose module
    imports and has that function (:class:`clax.data.UserBenchmark`; whether it returns a Benchmark is
    known only by calling it, which loads data: the CLI does that before a run touches its workdir).

    Raises:
      ConfigError: an unknown name (listing the valid ones), or a reference that does not resolve, naming it.
    """
    from clax.data import UserBenchmark, is_reference

    if not is_reference(name):
        check_name("benchmark", name, BENCHMARKS)
        return
    try:
        UserBenchmark(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_method_name(name: str):
    """The :class:`~clax.methods.MethodSpec` of ``name``: a registered method or several joined with
    ``+`` (``replay+lwf``).

    Raises:
      ConfigError: an unknown part (listing the valid names) or an impossible combination.
    """
    try:
        return spec_of(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def default_config(method: str = "finetune", benchmark: str = "split-digits") -> dict:
    """The default configuration for ``method`` on ``benchmark``."""
    spec = check_method_name(method)
    check_benchmark_name(benchmark)
    bb = spec.backbone
    return {
        "method": method,
        "benchmark": benchmark,
        "scenario": spec.scenarios[0],
        "seed": 0,
        "data_dir": "",  # where real data sets live (image folders, TFDS data dir); see clax.data
        "data": dict(DATA_DEFAULTS),  # image size, normalisation, augmentation, class order, images per class
        "train": {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "seed"} | spec.train,
        "backbone": {"name": bb, **copy.deepcopy(BACKBONES[bb][1]), **copy.deepcopy(spec.backbone_settings)},
        **({method: copy.deepcopy(spec.defaults)} if "+" not in method else copy.deepcopy(spec.defaults)),
        "checkpoint": {"every_steps": 0, "keep": 2},
        "mesh": dict(MESH_DEFAULTS),
        **copy.deepcopy(RECORD_DEFAULTS),
    }


def _is_int_text(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


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
            # JSON, or comma-separated items: integers where every item is one (layer widths), else
            # strings (e.g. train.lr_scales=shared/backbone=0.1,task/head=2)
            items = [v for v in raw.split(",") if v]
            val = json.loads(raw) if raw.strip().startswith("[") else (
                [int(v) for v in items] if all(_is_int_text(v) for v in items) else items)
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


#: the ``checkpoint`` section: ``every_steps`` (0: only at task ends) and ``keep`` (in-task checkpoints kept)
CHECKPOINT_RULES = {"every_steps": NON_NEGATIVE_INT, "keep": POSITIVE_INT}

#: sections that change what a run records or how fast it starts, never its results (so a resume does not
#: compare them, :func:`clax.tracking.run_identity`): ``log.tensorboard`` (event files in ``<workdir>/tb``),
#: ``log.wandb`` (a Weights & Biases project; "" = off), ``eval.every_epoch`` (test accuracy of the seen
#: tasks after every epoch, logged to TensorBoard), ``cache.xla`` (JAX's persistent compilation cache in
#: the user cache directory) and ``cache.pretrain`` (pretrained frozen backbones shared by runs there;
#: :mod:`clax.cache`)
RECORD_DEFAULTS = {"log": {"tensorboard": True, "wandb": ""}, "eval": {"every_epoch": False},
                   "cache": {"xla": True, "pretrain": True}}


def _check_record_sections(cfg: dict) -> None:
    """Checks the sections of :data:`RECORD_DEFAULTS` where ``cfg`` has them (older configs lack them),
    and that Weights & Biases is installed where ``log.wandb`` names a project."""
    import importlib.util

    for name, defaults in RECORD_DEFAULTS.items():
        if name in cfg:
            if not isinstance(cfg[name], dict):
                raise ConfigError(f"{name} must be a section of settings ({', '.join(defaults)}), got {cfg[name]!r}")
            check_settings(name, defaults, cfg[name])
    project = cfg.get("log", {}).get("wandb", "")
    if project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={project} needs Weights & Biases, which is not installed: pip install wandb "
                          f"(or leave log.wandb empty)")


#: the ``mesh`` section (:mod:`clax.mesh`): ``data`` (0: all devices), ``model``, ``shard_min_size``
MESH_RULES = {"data": NON_NEGATIVE_INT, "model": POSITIVE_INT, "shard_min_size": POSITIVE_INT, "shard": REGEX}


def check_mesh(cfg: dict) -> None:
    """Checks the ``mesh`` section against this process's devices and the batch sizes, before any data
    loads: the mesh must divide the device count and its data axis the train and eval batch sizes.

    Raises:
      ConfigError: naming the setting and the numbers.
    """
    from clax import mesh as M

    sec = cfg.get("mesh") or {}
    unknown = sorted(set(sec) - set(MESH_RULES))
    if unknown:
        raise ConfigError(f"unknown setting mesh.{unknown[0]}; valid: {', '.join('mesh.' + k for k in MESH_RULES)}")
    for k, rule in MESH_RULES.items():
        if k in sec:
            check_value(f"mesh.{k}", sec[k], rule)
    try:
        mesh = M.from_config(sec)
        M.check_batch(mesh, int(cfg["train"].get("batch_size", 32)))
        M.check_batch(mesh, int(cfg["train"].get("eval_batch_size", 256)), "train.eval_batch_size")
    except M.MeshError as e:
        raise ConfigError(str(e)) from None


def check_data(cfg: dict) -> None:
    """Checks the ``data`` section (:data:`clax.data.pipeline.DATA_DEFAULTS`) where ``cfg`` has one (older
    configs lack it), and that the benchmark takes every setting away from its default.

    Raises:
      ConfigError: naming ``data.<key>``, its value and the valid ones.
    """
    if "data" not in cfg:
        return
    if not isinstance(cfg["data"], dict):
        raise ConfigError(f"data must be a section of settings ({', '.join(DATA_DEFAULTS)}), got {cfg['data']!r}")
    try:
        if is_reference(cfg["benchmark"]):
            data_kwargs(cfg["data"])
        else:
            benchmark_kwargs(BENCHMARKS[cfg["benchmark"]], {"data": cfg["data"]}, cfg["benchmark"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: dict) -> None:
    """Checks every setting of ``cfg``: the names, ``seed`` (an integer >= 0), the ``train`` section
    (:class:`~clax.train.TrainConfig`), ``checkpoint`` (``keep >= 1``, ``every_steps >= 0``), the
    backbone's settings and the method's (types and ranges; each factory checks again what depends on
    the stream). Nothing is loaded, built or written, so a run can call it before touching its workdir.

    Raises:
      ConfigError: naming the first bad key (``train.lr``, ``checkpoint.keep``, ``backbone.nf``,
        ``replay.buffer_size``) and its value.
    """
    try:
        for key in ("method", "benchmark", "scenario", "seed", "train", "backbone"):
            if key not in cfg:
                raise ConfigError(f"the config has no {key!r}")
        check_method_name(cfg["method"])
        check_benchmark_name(cfg["benchmark"])
        check_name("scenario", cfg["scenario"], SCENARIOS)
        check_scenario_of(cfg["method"], cfg["scenario"])
        if not isinstance(cfg.get("data_dir", ""), str):
            raise ConfigError(f"data_dir must be a string, got {cfg['data_dir']!r}")
        check_data(cfg)
        train_config(cfg)
        sec = cfg.get("checkpoint", {})
        for k, rule in CHECKPOINT_RULES.items():
            if k in sec:
                check_value(f"checkpoint.{k}", sec[k], rule)
        check_mesh(cfg)
        bb = dict(cfg["backbone"])
        check_backbone_settings(bb.pop("name", None), bb)
        check_method_settings(cfg["method"], method_settings(cfg))
        _check_record_sections(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def check_workdir(workdir: str, fresh: bool = False) -> None:
    """Checks, before anything is written, that ``workdir`` can hold a run: it is a directory or can
    be made one (no file in the way, no name too long for the file system, writable), and with
    ``fresh`` that an existing one can be moved aside (not the current directory or one above it, a
    writable parent, a free ``.old-N`` name).

    Raises:
      ConfigError: naming the workdir and what is wrong.
    """
    if not isinstance(workdir, str) or not workdir:
        raise ConfigError(f"workdir must be a non-empty path, got {workdir!r}")
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.lexists(probe):  # the nearest existing ancestor
        probe = os.path.dirname(probe)
    try:
        name_max = os.pathconf(probe if os.path.isdir(probe) else os.path.dirname(probe), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"workdir {workdir}: the name {part[:40]}... has {len(os.fsencode(part))} bytes; "
                              f"the file system allows {name_max}")
    if fresh and len(os.fsencode(os.path.basename(path))) + len(".old-999") > name_max:
        raise ConfigError(f"workdir {workdir}: its name is too long to move it aside as {os.path.basename(path)}"
                          f".old-N (the file system allows {name_max} bytes); use a shorter --workdir")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"workdir {workdir} is a file, not a directory; use another --workdir")
    if probe != path and not os.path.isdir(probe):
        raise ConfigError(f"workdir {workdir}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir}: {probe} is not writable")
    if fresh and os.path.isdir(path) and os.listdir(path):
        cwd = os.path.realpath(os.getcwd())
        real = os.path.realpath(path)
        if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep) or real == os.sep:
            raise ConfigError(f"--fresh cannot move workdir {workdir} aside: it is the current directory or "
                              f"one above it; run from outside it (e.g. from {os.path.dirname(real)})")
        parent = os.path.dirname(real)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--fresh cannot move workdir {workdir} aside: {parent} is not writable")
