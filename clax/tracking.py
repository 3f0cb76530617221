"""What a run records for people watching it: TensorBoard event files in ``<workdir>/tb`` and, when the
user installs it and asks (``log.wandb=PROJECT``), Weights & Biases.

The event files are written by tensorboardX, which needs neither TensorFlow nor PyTorch (only protobuf
and numpy, which clax already has); TensorBoard itself is only needed to look at them
(``pip install tensorboard; tensorboard --logdir runs``). Everything is written with the global step,
the number of optimizer steps taken so far (``TrainState.step``):

* per epoch (the rows of ``metrics.csv``): ``loss/total`` and every named loss term ``loss/<term>``
  (``loss/ce``, ``loss/kl``, ...), ``opt/lr``, ``opt/grad_norm``, ``speed/images_per_s`` and
  ``speed/step_ms`` (the epoch's training wall time per step, end-of-epoch work excluded; the first epoch
  of a process includes compilation); with ``train.val_fraction > 0`` ``val/loss`` and ``val/acc`` (the
  held-out rows of the task, :func:`clax.train.validate`);
* after each task: ``acc/task_<c>`` for every task seen so far and ``acc/ACC`` (their mean), i.e. the
  accuracy matrix as it fills;
* with ``eval.every_epoch=true``: ``epoch_acc/task_<c>`` and ``epoch_acc/mean`` after every epoch (test
  accuracy of the tasks seen so far with the state at the epoch's end; the run's results do not change);
* at the end: the heatmap of the accuracy matrix, the capacity per task of parameter-isolation methods
  and the labelled prototypes of PAH as images, ``final/ACC``, ``final/BWT``, ``final/FWT`` and
  ``final/forgetting``, and the run's config as hyperparameters (the ``hparams`` sub-run; also as text,
  ``config``, at the start).

A resumed run opens a new event file in the same folder that starts with a TensorBoard purge marker at
the checkpoint's step + 1: whatever the killed process wrote after its last checkpoint is hidden and
written again by the resumed one, so TensorBoard shows every row once. The writer is flushed before each
checkpoint, so nothing written before a checkpoint is lost. A finished workdir run again writes nothing.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import numpy as np

TB_DIR = "tb"
#: config sections that change what a run records, not its results (see :data:`clax.config.RECORD_DEFAULTS`)
RECORD_SECTIONS = ("log", "eval", "cache")
#: row keys of :func:`clax.train.fit`'s ``log`` rows that are not loss terms
_NOT_TERMS = ("task", "epoch", "loss", "lr", "grad_norm", "seconds", "val_loss", "val_acc")


def run_identity(cfg: dict) -> dict:
    """``cfg`` without the sections that do not change results (:data:`RECORD_SECTIONS`): what a
    checkpoint stores and a resume compares, so that turning TensorBoard or the cache on or off resumes
    the same run, and workdirs written before these settings existed still resume."""
    return {k: v for k, v in cfg.items() if k not in RECORD_SECTIONS}


def hparams(cfg: dict, prefix: str = "") -> dict:
    """``cfg`` flattened to dotted keys with values TensorBoard's hyperparameter plugin takes (bool, int,
    float, str; lists and None as their JSON text)."""
    out: dict = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def _png_size(png: bytes) -> tuple[int, int]:
    """``(height, width)`` from a PNG's header."""
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")


class Tracker:
    """The run's TensorBoard writer (and Weights & Biases run), fed by :func:`clax.train.fit`'s hooks.

    Use ``log=tracker.row`` (after the caller's own), ``on_epoch_end=tracker.epoch_end``,
    ``on_task_end=tracker.task_end``, then :meth:`finish` with the results and :meth:`close`.

    Args:
      workdir: the run's workdir; the event files go to ``<workdir>/tb``.
      cfg: the run's config (its ``log`` and ``eval`` sections are read; the whole is logged).
      batch_size: training batch size (images per step).
      start_step: the global step the run starts from (a resumed checkpoint's ``TrainState.step``).
      resumed: the run continues from a checkpoint (a purge marker at ``start_step + 1`` is written).
      evaluate: ``(train_state, task) -> accuracy``, used with ``eval.every_epoch``.
    """

    def __init__(self, workdir: str, cfg: dict, batch_size: int, start_step: int = 0, resumed: bool = False,
                 evaluate=None):
        self.cfg, self.batch_size, self.evaluate = cfg, batch_size, evaluate
        self.every_epoch = bool(cfg.get("eval", {}).get("every_epoch", False))
        self.last_step, self.pending = int(start_step), None
        self.task_seconds: dict = {}  # task -> (seconds of its last row, hook seconds since then)
        self.writer = None
        if cfg.get("log", {}).get("tensorboard", True):
            from tensorboardX import SummaryWriter

            # a suffix in nanoseconds: a resumed process started within the same second as the killed one
            # gets its own file, which sorts after the killed one's (TensorBoard reads files in name order)
            self.writer = SummaryWriter(os.path.join(workdir, TB_DIR), flush_secs=30,
                                        filename_suffix=f".{time.time_ns()}",
                                        purge_step=int(start_step) + 1 if resumed else None)
            if not resumed:
                self.writer.add_text("config", "```\n" + json.dumps(cfg, indent=1) + "\n```", 0)
        self.wandb = _wandb_run(workdir, cfg) if cfg.get("log", {}).get("wandb") else None

    def scalars(self, values: dict, step: int) -> None:
        """Writes each ``tag: value`` at ``step`` (non-finite and None values are skipped)."""
        values = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def png(self, tag: str, png: bytes, step: int) -> None:
        """Writes the PNG bytes ``png`` as image ``tag`` at ``step``."""
        if self.writer is not None:
            from tensorboardX.proto.summary_pb2 import Summary

            h, w = _png_size(png)
            img = Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)
        if self.wandb is not None:
            import io

            import wandb
            from PIL import Image

            self.wandb.log({tag: wandb.Image(Image.open(io.BytesIO(png)))}, step=step)

    def flush(self) -> None:
        """Writes everything buffered to disk (before a checkpoint, so that a kill loses nothing)."""
        if self.writer is not None:
            self.writer.flush()

    def row(self, row: dict) -> None:
        """``fit``'s ``log`` hook: keeps the epoch's row until :meth:`epoch_end` gives its step."""
        self.pending = (dict(row), time.perf_counter())

    def epoch_end(self, task: int, epoch: int, ts) -> None:
        """``fit``'s ``on_epoch_end`` hook: writes the epoch's row (and, with ``eval.every_epoch``, the
        test accuracy of tasks ``0..task``) at the state's step."""
        t_in = time.perf_counter()
        step = int(ts.step)
        row, t_row = self.pending if self.pending else ({}, t_in)
        self.pending = None
        n = step - self.last_step
        self.last_step = step
        prev_s, hooks_s = self.task_seconds.get(task, (0.0, 0.0))
        epoch_s = float(row.get("seconds", 0.0)) - prev_s - hooks_s
        vals = {"loss/total": row.get("loss"), "opt/lr": row.get("lr"), "opt/grad_norm": row.get("grad_norm"),
                **({"val/loss": row["val_loss"], "val/acc": row["val_acc"]} if "val_loss" in row else {}),
                **{f"loss/{k}": v for k, v in row.items() if k not in _NOT_TERMS}}
        if n > 0 and epoch_s > 0:
            vals.update({"speed/images_per_s": n * self.batch_size / epoch_s, "speed/step_ms": 1e3 * epoch_s / n})
        if self.every_epoch and self.evaluate is not None:
            accs = [self.evaluate(ts, c) for c in range(task + 1)]
            vals.update({f"epoch_acc/task_{c}": a for c, a in enumerate(accs)})
            vals["epoch_acc/mean"] = float(np.mean(accs))
        self.scalars(vals, step)
        self.flush()
        # the next row's seconds (since the task's start) include this hook and the log hook before it
        self.task_seconds[task] = (float(row.get("seconds", 0.0)), time.perf_counter() - t_row)

    def task_end(self, task: int, ts, A: np.ndarray) -> None:
        """``fit``'s ``on_task_end`` hook: the accuracy matrix's row ``task`` as ``acc/task_<c>`` and ACC."""
        row = np.asarray(A, np.float64)[task, : task + 1]
        self.scalars({**{f"acc/task_{c}": a for c, a in enumerate(row)}, "acc/ACC": float(np.mean(row))},
                     int(ts.step))
        self.flush()

    def finish(self, results: dict, step: int, figures: dict) -> None:
        """The end of the run: ``final/*`` metrics, the ``figures`` (tag -> PNG bytes) and the config as
        hyperparameters with ACC, BWT and forgetting as their metrics."""
        final = {f"final/{k.upper() if k in ('acc', 'bwt', 'fwt') else k}": results.get(k)
                 for k in ("acc", "bwt", "fwt", "forgetting")}
        self.scalars(final, step)
        for tag, png in figures.items():
            self.png(tag, png, step)
        if self.writer is not None:
            metrics = {f"hparam/{k.split('/')[1]}": v for k, v in final.items() if v is not None}
            self.writer.add_hparams(hparams(self.cfg), metrics, name="hparams", global_step=step)
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in final.items() if v is not None})
        self.flush()

    def close(self) -> None:
        """Closes the event file (and finishes the Weights & Biases run)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(workdir: str, cfg: dict) -> Any:
    """A Weights & Biases run for project ``cfg["log"]["wandb"]``, named after the workdir; its id is
    kept in ``<workdir>/tb/wandb-id`` so that a resumed run continues the same W&B run."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"log.wandb={cfg['log']['wandb']} needs Weights & Biases, which is not installed: "
                         f"pip install wandb (or leave log.wandb empty)") from None
    from clax.workdir import atomic_open

    id_file = os.path.join(workdir, TB_DIR, "wandb-id")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        os.makedirs(os.path.dirname(id_file), exist_ok=True)
        with atomic_open(id_file, "w") as f:
            f.write(run_id)
    return wandb.init(project=cfg["log"]["wandb"], name=os.path.basename(os.path.abspath(workdir)), id=run_id,
                      resume="allow", dir=workdir, config=cfg)


def open_tracker(workdir: Optional[str], cfg: dict, batch_size: int, resume=None,
                 evaluate=None) -> Optional[Tracker]:
    """The :class:`Tracker` of a run in ``workdir``, or None: no workdir, nothing to record (``log.tensorboard``
    false and no ``log.wandb``), or a finished run run again (``resume``'s progress has every task done:
    it trains nothing and its event files are complete).

    Args:
      resume: ``(train_state, progress)`` of the checkpoint the run continues from, or None.
    """
    log = cfg.get("log", {})
    if not workdir or not (log.get("tensorboard", True) or log.get("wandb")):
        return None
    start, resumed = 0, resume is not None
    if resumed:
        ts, prog = resume
        if prog.tasks_done >= prog.accuracy_matrix.shape[0]:
            return None
        start = int(ts.step)
    return Tracker(workdir, cfg, batch_size, start, resumed, evaluate)


def evaluator(method, bench, scenario: str, batch_size: int, compiler_options=None):
    """``(train_state, task) -> test accuracy``, for ``eval.every_epoch``: its own compiled eval step,
    made at the first call (so a run without ``eval.every_epoch`` compiles nothing more), with the run's
    steps' ``compiler_options`` (:func:`clax.models.step_options`)."""
    made: list = []

    def evaluate(ts, c: int) -> float:
        import optax

        from clax.train import Steps, evaluate as eval_task

        if not made:
            made.append(Steps(method, optax.identity(), scenario, compiler_options))
        return eval_task(made[0], ts.cl, bench, scenario, c, batch_size)

    return evaluate


def hooks(tracker: Optional[Tracker], log) -> dict:
    """:func:`clax.train.fit`'s keyword arguments that feed ``tracker`` (``log`` first gets each row);
    just ``log`` without a tracker."""
    if tracker is None:
        return {"log": log}

    def both(row):
        log(row)
        tracker.row(row)

    return {"log": both, "on_epoch_end": tracker.epoch_end, "on_task_end": tracker.task_end}


def run_figures(results: dict, cl, bench, heatmap_path: Optional[str] = None) -> dict:
    """The end-of-run images as ``{tag: PNG bytes}``: ``figures/accuracy_matrix`` (the PNG at
    ``heatmap_path`` where one is given and exists; drawn where none is given), ``figures/capacity``
    where ``results`` has ``capacity_used`` and ``figures/prototypes`` where ``cl.shared`` has a
    prototype table."""
    from clax import plot

    figs: dict = {}
    if heatmap_path is None:
        figs["figures/accuracy_matrix"] = plot.figure_png(plot.heatmap_figure(results["accuracy_matrix"]))
    elif os.path.exists(heatmap_path):  # the runner's accuracy_matrix.png, not drawn twice
        with open(heatmap_path, "rb") as f:
            figs["figures/accuracy_matrix"] = f.read()
    if results.get("capacity_used") is not None:
        figs["figures/capacity"] = plot.figure_png(plot.capacity_figure({results["method"]: results}))
    shared = getattr(cl, "shared", None)
    if isinstance(shared, dict):
        from clax.inspect import is_prototypes, prototype_images

        for name, a in shared.items():
            imgs = prototype_images(np.asarray(a)) if is_prototypes(name) and hasattr(a, "ndim") else None
            if imgs is not None:
                figs["figures/prototypes"] = plot.figure_png(plot.prototypes_figure(
                    imgs, plot.task_labels(bench), f"{results['method']}: prototypes"))
    return figs
