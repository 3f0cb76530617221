"""From a config to a finished run: build the pieces, train, write the workdir.

A workdir receives ``results.json``, ``metrics.csv`` (a row per task and epoch, columns in
:func:`metrics_columns`'s order: ``task, epoch, loss``, the method's named loss terms in alphabetical
order (e.g. ``ce, kl`` for ibm, ``ce, reg`` for hnet, ``ce, kd`` for lwf), ``lr`` (the epoch's learning
rate, :func:`clax.train.lr_at`; per-partition ``train.lr_scales`` multiply it), ``grad_norm`` (the
global norm of the gradient the optimizer receives, after the method's update mask) and ``seconds``;
each value but ``lr`` and ``seconds`` is the mean over the epoch's steps; with ``train.val_fraction > 0``
also ``val_loss`` and ``val_acc`` before ``lr``), ``accuracy_matrix.png`` and
``checkpoints/`` (Orbax, one per finished task); the frozen-backbone methods cache their pretraining in
``pretrain/``. Each file is written atomically and the workdir is locked while a run uses it
(``.clax.lock``, see :mod:`clax.workdir`).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np

from clax import checkpoint as ckpt
from clax import mesh as M
from clax.mesh import MESH_DEFAULTS
from clax import workdir as wd
from clax.config import ConfigError, check_workdir, train_config, validate
from clax.data import BENCHMARKS, get_benchmark
from clax.methods import get_method, method_settings, parts
from clax.models import backbone_view, get_backbone, step_options
from clax.plot import accuracy_heatmap
from clax.train import NonFiniteLossError, fit, make_context, make_optimizer, validation_splits
from clax import cache, tracking


def _checkpointing(cfg: dict, workdir: str, method, tcfg, fresh: bool) -> tuple[dict, list]:
    """fit()'s checkpoint arguments for ``workdir`` (resuming where it holds checkpoints) and the
    metrics rows so far."""
    if fresh and M.is_main() and (old := wd.move_aside(workdir)):
        ckpt._say(f"moved the previous run to {old}; starting fresh in {workdir}")
    M.barrier("clax-workdir-ready")  # the other processes read the workdir once process 0 has moved it
    found = ckpt.load_resume(workdir, cfg, method, make_optimizer(tcfg, method))
    M.barrier("clax-resume-read")  # every process has read the workdir before any writes to it
    rows: list[dict] = []
    kw: dict = {}
    if found:
        ts, prog, rows = found
        T = prog.accuracy_matrix.shape[0]
        where = "the finished run" if prog.tasks_done >= T else (
            f"task {prog.tasks_done}, step {prog.task_step} of the task" if prog.task_step else
            f"the start of task {prog.tasks_done}")
        ckpt._say(f"resuming {workdir} from checkpoint step {int(ts.step)} ({where}); --fresh starts over")
        kw["resume"] = (ts, prog)
    sec = cfg.get("checkpoint", {})
    mngr = ckpt.manager(workdir, keep=sec.get("keep", 2))

    def save(ts, progress):
        ckpt.save_progress(mngr, ts, progress, cfg, rows)

    save.mngr = mngr
    kw.update(checkpoint=save, checkpoint_every=int(sec.get("every_steps", 0)))
    return kw, rows


def _last_good(e: Exception, workdir: str | None, kw: dict) -> str:
    """The message of a non-finite-loss stop, with where the last good checkpoint is."""
    if not kw:
        return f"{e}; stopped"
    mngr = kw["checkpoint"].mngr
    mngr.wait_until_finished()
    step = mngr.latest_step()
    where = f"the last good checkpoint (step {step}) is kept in {ckpt.checkpoint_dir(workdir)}" \
        if step is not None else "no checkpoint had been written"
    return f"{e}; stopped, {where}"


FIRST_COLUMNS = ("task", "epoch", "loss")
LAST_COLUMNS = ("lr", "grad_norm", "seconds")
#: the validation columns (``train.val_fraction > 0``), before :data:`LAST_COLUMNS` where some row has them
VAL_COLUMNS = ("val_loss", "val_acc")


def metrics_columns(rows: list[dict]) -> list[str]:
    """The columns of ``metrics.csv`` for ``rows``: ``task, epoch, loss``, every other name found in a row
    (the method's loss terms) in alphabetical order, then ``val_loss, val_acc`` (only where some row has
    them: a run with a validation set), then ``lr, grad_norm, seconds``. Of the loss terms only those
    some row has appear (a method's own terms and no other's); a row without a column (e.g. one written
    by an older clax, restored from a checkpoint) leaves it empty."""
    names = {k for r in rows for k in r}
    mid = sorted(names - set(FIRST_COLUMNS) - set(LAST_COLUMNS) - set(VAL_COLUMNS))
    return [*FIRST_COLUMNS, *mid, *[c for c in VAL_COLUMNS if c in names], *LAST_COLUMNS]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def build(cfg: dict):
    """``(benchmark, context, method)`` for a config; every setting is checked first
    (:func:`clax.config.validate`: a ``ConfigError`` naming the key), before any data loads."""
    validate(cfg)
    bb = dict(cfg["backbone"])
    name = bb.pop("name")
    from clax.data.pipeline import benchmark_kwargs

    bench = get_benchmark(cfg["benchmark"], seed=cfg["seed"], view=backbone_view(name),
                          **benchmark_kwargs(BENCHMARKS[cfg["benchmark"]], cfg, cfg["benchmark"]))
    backbone = get_backbone(name, bench.input_shape, **bb)
    ctx = make_context(backbone, bench, cfg["scenario"])
    method = get_method(cfg["method"], ctx, **method_settings(cfg))
    return bench, ctx, method


def run(cfg: dict, workdir: str | None = None, progress: bool = True, fresh: bool = False) -> dict:
    """Trains and evaluates the run described by ``cfg``; writes the workdir if one is given.

    A workdir that holds checkpoints of the same config is resumed from its newest intact one (the
    results equal those of an uninterrupted run); one of a different config is refused (ValueError
    naming the keys) unless ``fresh``, which moves the old run to ``WORKDIR.old-N`` once the config
    has been checked. Paths inside the workdir are stored relative to it (:func:`workdir_config`), so
    a moved workdir resumes. The workdir is locked for the whole run (:func:`clax.workdir.lock`): a
    second run on it raises :class:`clax.workdir.WorkdirBusy` (a ValueError naming the workdir and
    the running process) before anything is read, moved or written. Every file is written atomically.

    Returns:
      The JSON-ready results (the content of ``results.json``).
    """
    validate(cfg)  # every setting, and the workdir, checked before the workdir is locked, moved or written
    cache.from_config(cfg)  # JAX's persistent compilation cache (cache.xla), before anything compiles
    cache.pretrain_from_config(cfg)  # pretrained frozen backbones shared by runs (cache.pretrain)
    if not workdir:
        return _run(cfg, None, progress, fresh)
    check_workdir(workdir, fresh)
    cfg = workdir_config(cfg, workdir)
    if not M.is_main():  # the other processes of a multi-process run: process 0 holds the lock
        return _run(cfg, workdir, progress, fresh)
    with wd.lock(workdir):  # one run per workdir, held until the last file is written
        return _run(cfg, workdir, progress, fresh)


def workdir_config(cfg: dict, workdir: str) -> dict:
    """``cfg`` as a workdir stores it: paths inside the workdir relative to it, so that a moved, copied
    or differently spelled workdir holds the same config. The frozen-backbone methods' pretraining
    cache, ``<workdir>/pretrain``, is stored as ``pretrain_dir=""`` (see :func:`resolve_paths`)."""
    for part in parts(cfg["method"]):
        sec = cfg.get(part, {})
        pre = sec.get("pretrain_dir") if isinstance(sec, dict) else None
        if pre and os.path.abspath(pre) == os.path.abspath(os.path.join(workdir, "pretrain")):
            cfg = {**cfg, part: {**sec, "pretrain_dir": ""}}
    return cfg


def resolve_paths(cfg: dict, workdir: str | None) -> dict:
    """``cfg`` with the paths a workdir stores relative to it made absolute: a frozen-backbone method's
    ``pretrain_dir=""`` is ``<workdir>/pretrain`` (without a workdir it stays ``""``: in memory only)."""
    for part in parts(cfg["method"]):
        sec = cfg.get(part, {})
        if workdir and isinstance(sec, dict) and sec.get("pretrain_dir") == "":
            cfg = {**cfg, part: {**sec, "pretrain_dir": os.path.abspath(os.path.join(workdir, "pretrain"))}}
    return cfg


def _run(cfg: dict, workdir: str | None, progress: bool, fresh: bool) -> dict:
    """:func:`run` with ``cfg`` in its stored form, the workdir (if any) locked."""
    bench, ctx, method = build(resolve_paths(cfg, workdir))
    mesh_cfg = {**MESH_DEFAULTS, **(cfg.get("mesh") or {})}
    mesh = M.from_config(mesh_cfg)
    if progress:
        d = M.describe(mesh)
        print(f"devices: {d['devices']} {d['platform']} ({d['processes']} process{'es' if d['processes'] > 1 else ''}), "
              f"mesh data={d['mesh']['data']} x model={d['mesh']['model']}", flush=True)
    tcfg = train_config(cfg)
    if tcfg.val_fraction:  # the validation split of every task, checked on the labels before the workdir changes
        try:
            validation_splits(bench, tcfg.val_fraction, tcfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    rows: list[dict] = []
    kw: dict = {}
    if workdir:
        ckpt.train_state_target(method, make_optimizer(tcfg, method))  # a dry init: what fails there fails before a move
        # checkpoints store and compare the config without log/eval/cache: they do not change results
        kw, rows = _checkpointing(tracking.run_identity(cfg), workdir, method, tcfg, fresh)
    tracker = tracking.open_tracker(workdir if M.is_main() else None, cfg, tcfg.batch_size, kw.get("resume"),
                                    tracking.evaluator(method, bench, ctx.scenario, tcfg.eval_batch_size,
                                                       step_options(ctx.backbone)))
    out = None
    try:
        out = fit(method, ctx, bench, tcfg, progress=progress, **tracking.hooks(tracker, rows.append), **kw,
                  mesh=mesh, shard_min_size=int(mesh_cfg["shard_min_size"]), shard=str(mesh_cfg["shard"]))
    except NonFiniteLossError as e:
        raise NonFiniteLossError(_last_good(e, workdir, kw)) from None
    finally:
        if tracker is not None and out is None:
            tracker.close()
        if kw:
            kw["checkpoint"].mngr.wait_until_finished()
            kw["checkpoint"].mngr.close()
    results = {
        "method": cfg["method"],
        "benchmark": cfg["benchmark"],
        "scenario": cfg["scenario"],
        "seed": cfg["seed"],
        "num_tasks": bench.num_tasks,
        "accuracy_matrix": out["accuracy_matrix"],
        "init_accuracy": out["init_accuracy"],
        "acc": out["acc"],
        "bwt": out["bwt"],
        "fwt": out["fwt"],
        "forgetting": out["forgetting"],
        "params": out["params"],
        "timing": out["timing"],
        "devices": out["devices"],
        **({"task_training": out["task_training"]} if "task_training" in out else {}),
        "config": cfg,
        **out.get("report", {}),  # optional per-method extras (Method.report), e.g. mask_density
    }
    results = _jsonable(results)
    if workdir and M.is_main():  # process 0 writes; each file atomically: a kill leaves the old or the new one
        with wd.atomic_open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with wd.atomic_open(os.path.join(workdir, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=metrics_columns(rows), restval="")
            w.writeheader()
            w.writerows(rows)
        accuracy_heatmap(out["accuracy_matrix"], os.path.join(workdir, "accuracy_matrix.png"),
                         f"{cfg['method']} on {cfg['benchmark']} ({cfg['scenario'].upper()}), "
                         f"ACC {out['acc']:.3f}, BWT {out['bwt']:+.3f}")
    if tracker is not None:  # TensorBoard: final metrics, figures, the config as hyperparameters
        try:
            tracker.finish(results, int(out["state"].step), tracking.run_figures(
                results, out["state"].cl, bench, os.path.join(workdir, "accuracy_matrix.png")))
        finally:
            tracker.close()
    return results
