"""The one continual trainer: any :class:`~clax.methods.Method` on any :class:`~clax.data.Benchmark`.

For each task: ``begin_task``, jit-compiled train steps over epochs, ``end_task``, then evaluation of
every task seen so far (and of the next one, for FWT, where the method can). The task id enters the
compiled step as a traced int32, the optimizer state is re-initialised with the same shapes, and all
batches have one shape, so moving to a new task does not recompile unless the method's shapes change.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax import mesh as M
from clax import partition as P
from clax.data import Benchmark, check_scenario, eval_batches, train_batches
from clax.methods.base import Context, Method, TaskData
from clax.metrics import CompileCounter, summarize
from clax.models import Backbone, jit_init, step_options
from clax.partition import CLState
from clax.compose import optimizer_step

PyTree = Any


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the task and step."""


@dataclasses.dataclass
class Progress:
    """Where a run stands, beside its :class:`TrainState`: what a checkpoint needs to resume it.

    Attributes:
      tasks_done: tasks finished (trained, ``end_task`` run and evaluated), ``0 .. T``.
      task_step: steps of task ``tasks_done`` already taken; 0 means its ``begin_task`` has not run. When
        it is a multiple of the batches per epoch, that epoch is finished: its ``end_epoch`` hook has run
        and its metrics row is logged, and the next epoch starts from here.
      accuracy_matrix: ``[T, T]`` so far (NaN where not evaluated); init_accuracy: ``[T]`` or None.
      train_s, steps: training seconds and global steps so far; compiles_after_task: per finished task.
      task_key: the key of the current task's ``end_epoch``/``end_task`` hooks (mid-task only).
      epoch_metrics: every metric of the current epoch's steps taken so far, by name (``loss``, the
        method's named terms, ``grad_norm``; a list of floats per name, one per step; mid-task only),
        so that a resumed epoch's means equal the uninterrupted run's.
      val: the current task's :class:`ValState` as a dict (``train.val_fraction > 0``, mid-task only):
        the plateau's rate, patience count, best value and epoch, and whether the task has stopped.
      best_cl: the method state (:class:`CLState`) of the current task's best-validation epoch so far
        (``train.restore_best``, mid-task only; None before the task's first epoch has ended).
      task_records: one dict per finished task (``train.val_fraction > 0``): ``task``, ``epochs`` run,
        ``best_epoch`` and ``stopped`` (``epochs``, ``plateau_floor`` or ``early_stop``).
    """

    tasks_done: int
    task_step: int
    accuracy_matrix: np.ndarray
    init_accuracy: Optional[np.ndarray]
    train_s: float = 0.0
    steps: int = 0
    compiles_after_task: list = dataclasses.field(default_factory=list)
    task_key: Optional[Any] = None
    epoch_metrics: dict = dataclasses.field(default_factory=dict)
    val: Optional[dict] = None
    best_cl: Optional[Any] = None
    task_records: list = dataclasses.field(default_factory=list)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: method state, optimizer state, RNG key, step."""

    cl: CLState
    opt_state: PyTree
    key: jax.Array
    step: jax.Array


@dataclasses.dataclass
class TrainConfig:
    """Settings of the training loop.

    Attributes:
      epochs: epochs per task.
      batch_size: training batch size (every batch has exactly this size).
      eval_batch_size: the most rows of a test batch (the last batch is padded and masked); smaller where
        every task's test set is (:func:`eval_batch_rows`).
      optimizer: ``adam``, ``adamw`` or ``sgd``.
      lr: learning rate; ``weight_decay``, ``momentum`` (sgd), ``clip`` (global norm, 0 = off).
      lr_schedule: how ``lr`` changes over each task's epochs (it restarts with every task):
        ``constant``; ``step:EVERY:GAMMA`` (multiply by ``GAMMA`` every ``EVERY`` epochs, e.g. CLR's
        ``step:20:0.1``); ``cosine`` (from ``lr`` to 0 over the task's epochs, one value per epoch);
        ``plateau:PATIENCE:FACTOR:FLOOR`` (driven by the validation set, so it needs ``val_fraction > 0``;
        see :func:`val_update`): each task starts at ``lr``; after ``PATIENCE`` epochs in a row without
        a better validation value the rate is divided by ``FACTOR`` (> 1) and the patience count
        restarts; when the rate falls below ``FLOOR`` the task's training stops (WSN's authors'
        ``--lr_patience 6 --lr_factor 2 --lr_min 1e-6`` is ``plateau:6:2:1e-6``).
      lr_scales: per-partition learning-rate multipliers, a list of ``"REGEX=SCALE"`` strings over the
        paths of the trained tree (:func:`trainable`: ``shared/...`` and ``task/...``, e.g.
        ``shared/backbone`` or ``task/head/kernel``). A pattern selects a leaf when it matches the leaf's
        whole path or the path of a subtree above it (``shared/backbone`` selects every backbone leaf);
        that leaf's update is multiplied by ``SCALE`` after the optimizer, i.e. its learning rate is
        ``SCALE * lr`` (its decoupled weight decay too). A method's own scales (:attr:`Method.lr_scales`,
        e.g. PAH's backbone) come first, these after; where several patterns select a leaf the last one
        wins. A pattern that selects nothing is an error. See :func:`lr_scale_transform`.
      seed: seeds parameters, data order and every random draw.
      val_fraction: in ``[0, 1)``; per task, this fraction of the task's training rows is held out as a
        validation set and never trained on (0 = off: every row is trained on). The rows are drawn per
        task, seeded by ``(seed, task)`` and stratified by class (:func:`validation_split`); the hooks
        that read the task's data (``begin_task``, ``train_filter``, ``end_epoch``, ``end_task``:
        replay buffers, Fisher estimates, prototypes) see only the rows trained on. After every epoch
        (after the method's ``end_epoch`` hook) the state is evaluated on them by the compiled eval
        step: ``val_loss`` (mean cross-entropy of the softmax of the method's ``predict`` output) and
        ``val_acc``, written to ``metrics.csv`` and TensorBoard (``val/loss``, ``val/acc``). A
        cumulative (joint) method validates on the held-out rows of every task it trains on. WSN's
        authors (``dataloader/*.py``: ``pc_valid``, 0.05 in their scripts) draw ``int(pc_valid * n)``
        rows uniformly with one permutation seeded by the run's seed alone; clax draws the same number,
        stratified by class and seeded per task.
      val_metric: ``loss`` (lower is better; WSN's authors') or ``acc`` (higher is better): the value
        that decides "better" for ``plateau``, ``early_stop`` and ``restore_best``. Improvement is
        strict (as in the authors' ``valid_loss < best_loss``): a tie is not an improvement.
      early_stop: stop a task's training after this many epochs in a row without a better validation
        value (counted from the last improvement; a plateau's rate cut does not restart it); 0 = off.
        Needs ``val_fraction > 0``. WSN's authors have no such rule (their plateau floor ends a task).
      restore_best: at the end of a task's epochs, before ``end_task``, the method's whole state
        (:class:`CLState`: every partition, model state and buffers) is set back to that of the epoch
        with the best validation value (as WSN's authors' ``set_model_(model, best_model)``, which
        restores the model's whole ``state_dict``). The optimizer state is not restored: it is
        re-initialised at the next task and nothing reads it before; the RNG key and step count go on.
        Needs ``val_fraction > 0``.

    With ``val_fraction > 0`` the run's results also list, per task, the epochs run, the best epoch and
    why training stopped (:func:`fit`'s ``task_training``). With the defaults (``val_fraction=0``, no
    plateau, ``early_stop=0``, ``restore_best=false``) nothing of this runs and a run is unchanged.
    """

    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    clip: float = 0.0
    lr_schedule: str = "constant"
    lr_scales: list = dataclasses.field(default_factory=list)
    seed: int = 0
    val_fraction: float = 0.0
    val_metric: str = "loss"
    early_stop: int = 0
    restore_best: bool = False

    def __post_init__(self):
        """Checks every setting where the config is made, before any data loads.

        Raises:
          ValueError: naming the setting as the config spells it (``train.lr``, ``seed``) and its value.
        """
        from clax.settings import (NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Rule, between,
                                   check_value, one_of)

        rules = {"epochs": POSITIVE_INT, "batch_size": POSITIVE_INT, "eval_batch_size": POSITIVE_INT,
                 "optimizer": one_of(*OPTIMIZERS), "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
                 "momentum": between(0, 1, "[)"), "clip": NON_NEGATIVE, "lr_schedule": Rule("str"),
                 "lr_scales": Rule("any"), "seed": NON_NEGATIVE_INT, "val_fraction": between(0, 1, "[)"),
                 "val_metric": one_of(*VAL_METRICS), "early_stop": NON_NEGATIVE_INT, "restore_best": Rule("bool")}
        for f in dataclasses.fields(self):
            check_value("seed" if f.name == "seed" else f"train.{f.name}", getattr(self, f.name), rules[f.name])
        parse_lr_scales(self.lr_scales)
        lr_at(self, 0)  # a bad schedule is an error here too
        parts = self.lr_schedule.split(":")
        if parts[0] == "step" and not (math.isfinite(float(parts[2])) and float(parts[2]) > 0):
            raise ValueError(f"train.lr_schedule {self.lr_schedule!r}: GAMMA must be a finite number > 0")
        if not self.val_fraction:
            needs = [f"train.lr_schedule={self.lr_schedule}" if parse_plateau(self.lr_schedule) else "",
                     f"train.early_stop={self.early_stop}" if self.early_stop else "",
                     "train.restore_best=true" if self.restore_best else ""]
            needs = [n for n in needs if n]
            if needs:
                raise ValueError(f"{needs[0]} needs a validation set: set train.val_fraction in (0, 1), "
                                 f"e.g. train.val_fraction=0.05")


VAL_METRICS = ("loss", "acc")
SCHEDULES = "constant, cosine, step:EVERY:GAMMA (e.g. step:20:0.1), plateau:PATIENCE:FACTOR:FLOOR (e.g. plateau:6:2:1e-6)"


def parse_plateau(schedule: str) -> Optional[tuple[int, float, float]]:
    """``(patience, factor, floor)`` of a ``plateau:PATIENCE:FACTOR:FLOOR`` schedule; None for any other.

    Raises:
      ValueError: a ``plateau`` schedule that is malformed (PATIENCE an integer >= 1, FACTOR a finite
        number > 1, FLOOR a finite number >= 0), naming ``train.lr_schedule`` and the valid form.
    """
    parts = schedule.split(":")
    if parts[0] != "plateau":
        return None
    try:
        patience, factor, floor = int(parts[1]), float(parts[2]), float(parts[3])
        ok = len(parts) == 4 and patience >= 1 and math.isfinite(factor) and factor > 1 \
            and math.isfinite(floor) and floor >= 0
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise ValueError(f"train.lr_schedule {schedule!r} is not valid: plateau:PATIENCE:FACTOR:FLOOR needs "
                         f"PATIENCE an integer >= 1, FACTOR a number > 1 and FLOOR a number >= 0 "
                         f"(e.g. plateau:6:2:1e-6, WSN's); valid: {SCHEDULES}")
    return patience, factor, floor


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based, within a task) under ``cfg.lr_schedule``.

    A ``plateau`` schedule depends on the validation values, not on the epoch: this is its starting rate,
    ``cfg.lr``; :func:`fit` follows its :class:`ValState` (:func:`val_update`).

    Raises:
      ValueError: an unknown or malformed schedule, naming it and the valid forms.
    """
    s = cfg.lr_schedule
    if s == "constant":
        return cfg.lr
    if parse_plateau(s):
        return cfg.lr
    if s == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    parts = s.split(":")
    if parts[0] == "step" and len(parts) == 3:
        try:
            every, gamma = int(parts[1]), float(parts[2])
        except ValueError:
            every = 0
        if every > 0:
            return cfg.lr * gamma ** (epoch // every)
    raise ValueError(f"train.lr_schedule {s!r} is not valid; valid: {SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class ValState:
    """Where a task's validation-driven training stands after its epochs so far (:func:`val_update`).

    Attributes:
      lr: the learning rate of the next epoch (``plateau``; otherwise the start rate, unused).
      best: the best validation value so far (None before one); best_epoch: its epoch (-1 before).
      wait: epochs in a row without improvement since the last improvement or rate cut (the plateau's
        patience count).
      stale: epochs in a row without improvement since the last improvement (``early_stop``'s count).
      epochs: epochs run so far in the task.
      stop: why the task stops before its last epoch: ``""`` (it does not), ``plateau_floor`` or
        ``early_stop``.
    """

    lr: float
    best: Optional[float] = None
    best_epoch: int = -1
    wait: int = 0
    stale: int = 0
    epochs: int = 0
    stop: str = ""


def val_update(vs: ValState, value: float, epoch: int, cfg: TrainConfig) -> ValState:
    """The :class:`ValState` after epoch ``epoch`` whose validation value (``cfg.val_metric``) is ``value``.

    A pure function, WSN's authors' rule (``main_wsn_*.py``): the value improves when it is strictly
    better than the best so far (lower loss, higher accuracy; a NaN never improves); an improvement
    records the value and epoch and resets both counts. Otherwise both counts grow; with a
    ``plateau:PATIENCE:FACTOR:FLOOR`` schedule, when ``wait`` reaches ``PATIENCE`` the rate is divided by
    ``FACTOR`` and ``wait`` restarts, and if the new rate is below ``FLOOR`` the task stops
    (``plateau_floor``; the authors' ``if lr < args.lr_min: break``). With ``cfg.early_stop = N > 0`` the
    task stops (``early_stop``) once ``stale`` reaches ``N``.
    """
    higher = cfg.val_metric == "acc"
    best = vs.best if vs.best is not None else (-math.inf if higher else math.inf)
    if (value > best) if higher else (value < best):
        return ValState(vs.lr, float(value), epoch, 0, 0, epoch + 1, "")
    lr, wait, stale, stop = vs.lr, vs.wait + 1, vs.stale + 1, ""
    plateau = parse_plateau(cfg.lr_schedule)
    if plateau and wait >= plateau[0]:
        lr, wait = lr / plateau[1], 0
        if lr < plateau[2]:
            stop = "plateau_floor"
    if not stop and cfg.early_stop and stale >= cfg.early_stop:
        stop = "early_stop"
    return ValState(lr, vs.best, vs.best_epoch, wait, stale, epoch + 1, stop)


def validation_split(y: np.ndarray, fraction: float, seed: int, task: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``: row indices of one task's training labels ``y``, the training rows
    sorted, the validation rows in a seeded random order (the classes mixed, as the authors' own splits
    give them: PAH's ``random_split``, WSN's ``np.random.permutation``). The order matters where the
    network predicts with the batch's statistics (``pah.bn=batch``, ``ibm.bn=batch``, ``wsn.bn=batch``):
    a validation batch of one class would normalise its class away.

    ``floor(fraction * len(y))`` rows are held out (the count WSN's authors hold out, ``int(pc_valid *
    n)``), spread over the classes in proportion to their rows (each class gets the floor of its share,
    the rest go one each to the classes with the largest remainders, ties to the lower label), each
    class's rows drawn at random with ``numpy.random.default_rng([0x76616C, seed, task])`` (a stream of
    its own: the epochs' data order uses ``(seed, task, epoch)``). The draw depends only on ``y``,
    ``fraction``, ``seed`` and ``task``.

    Raises:
      ValueError: naming ``train.val_fraction``: the split leaves a class with no training row, or the
        task with no validation row.
    """
    y = np.asarray(y)
    n = len(y)
    rng = np.random.default_rng([0x76616C, int(seed), int(task)])
    classes, counts = np.unique(y, return_counts=True)
    total = math.floor(fraction * n + 1e-9)
    share = fraction * counts
    take = np.floor(share + 1e-9).astype(np.int64)
    rest = total - int(take.sum())
    if rest > 0:
        order = np.lexsort((classes, -(share - take)))  # largest remainder first, then the lower label
        take[order[:rest]] += 1
    if total == 0:
        raise ValueError(f"train.val_fraction={fraction} holds out no row of task {task}'s {n} training rows; "
                         f"raise it (at least {1 / n:.3g}) or set it to 0")
    empty = [int(c) for c, k, m in zip(classes, take, counts) if k >= m]
    if empty:
        raise ValueError(f"train.val_fraction={fraction} leaves class {empty[0]} of task {task} with no training "
                         f"row ({int(counts[list(classes).index(empty[0])])} rows, all held out); lower it")
    val = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    val = rng.permutation(np.sort(np.concatenate(val))) if val else np.zeros(0, np.int64)
    keep = np.ones(n, bool)
    keep[val] = False
    return np.flatnonzero(keep), val


def validation_splits(bench: Benchmark, fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`validation_split` of every task of ``bench`` (labels only: no image is read).

    Raises:
      ValueError: as :func:`validation_split`, for the first task it fails on.
    """
    return [validation_split(np.asarray(t.y_train), fraction, seed, t.task_id) for t in bench.tasks]


def set_lr(opt_state, lr: float):
    """``opt_state`` of an optimizer from :func:`make_optimizer` with its learning rate set to ``lr``.

    Only a scheduled optimizer (``lr_schedule`` other than ``constant``) carries its rate in the state
    (``optax.inject_hyperparams``); the new rate is an array of the same dtype, so nothing recompiles.
    A state without a ``learning_rate`` hyperparameter (a constant rate, or an optimizer the user gave
    :func:`fit`, which controls its own schedule) is returned unchanged.
    """
    hp = getattr(opt_state, "hyperparams", None)
    if not isinstance(hp, dict) or "learning_rate" not in hp:
        return opt_state
    hp = dict(hp)
    hp["learning_rate"] = jnp.asarray(lr, hp["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hp)


OPTIMIZERS = ("adam", "adamw", "sgd")


def parse_lr_scales(items, setting: str = "train.lr_scales") -> list[tuple[str, float]]:
    """``[(regex, scale)]`` of a list of ``"REGEX=SCALE"`` strings (split at the last ``=``).

    Raises:
      ValueError: naming ``setting`` and the bad entry: not a list of strings, no ``=``, a regular
        expression that does not compile, or a scale that is not a finite number ``>= 0``.
    """
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{setting} must be a list of REGEX=SCALE strings (e.g. [\"shared/backbone=0.1\"]), "
                         f"got {items!r}")
    out = []
    for item in items:
        pattern, eq, raw = item.rpartition("=")
        if not eq or not pattern:
            raise ValueError(f"{setting} entry {item!r} must be REGEX=SCALE, e.g. shared/backbone=0.1")
        try:
            scale = float(raw)
        except ValueError:
            scale = math.nan
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"{setting} entry {item!r}: SCALE must be a finite number >= 0, got {raw!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{setting} entry {item!r}: {pattern!r} is not a regular expression ({e})") from None
        out.append((pattern, scale))
    return out


#: the ``/``-joined path of every leaf (:func:`clax.partition.tree_paths`): what ``lr_scales`` patterns match
tree_paths = P.tree_paths


def lr_scale_transform(rules) -> optax.GradientTransformation:
    """Per-partition learning rates: ``optax.multi_transform`` of one ``optax.scale(SCALE)`` per rule,
    labelled by the trained tree's paths (:func:`tree_paths`), leaves no rule selects left alone.

    Args:
      rules: ``[(regex, scale, origin)]``; ``regex`` selects a leaf when it fully matches the leaf's path
        or the path of a subtree above it; the last rule that selects a leaf gives its scale; ``origin``
        names where the rule came from (``train.lr_scales``, ``pah``) in errors.

    Chained after an optimizer, it multiplies each selected leaf's update, i.e. its learning rate, by
    its scale. The labels are computed from the tree at ``init`` (and again, identically, at each
    ``update``), so a rule that selects no leaf is found wherever the optimizer state is made.

    Raises:
      ValueError (at ``init``): a rule selects no leaf; the message names its origin and the paths'
        first two levels.
    """
    rules = list(rules)
    compiled = [re.compile(f"(?:{pattern})(?:/.*)?") for pattern, _, _ in rules]

    def labels(tree):
        paths = tree_paths(tree)
        out, used = [], set()
        for p in paths:
            label = "unscaled"
            for i, rx in enumerate(compiled):
                if rx.fullmatch(p):
                    label = f"scale_{i}"
                    used.add(i)
            out.append(label)
        for i, (pattern, _, origin) in enumerate(rules):
            if i not in used:
                tops = sorted({"/".join(p.split("/")[:2]) for p in paths})
                raise ValueError(f"{origin}: {pattern!r} selects no trained parameter; the trained tree's paths "
                                 f"start with {', '.join(tops) or '(none)'}")
        return jax.tree.unflatten(jax.tree.structure(tree), out)

    transforms = {"unscaled": optax.identity(), **{f"scale_{i}": optax.scale(s) for i, (_, s, _) in enumerate(rules)}}
    return optax.multi_transform(transforms, labels)


def lr_scale_rules(cfg: TrainConfig, method: Optional[Method] = None) -> list[tuple[str, float, str]]:
    """``[(regex, scale, origin)]``: ``method``'s own scales (:attr:`Method.lr_scales`), then
    ``cfg.lr_scales`` (later rules win where both select a leaf)."""
    own = [(p, float(v), f"{method.name}'s lr_scales") for p, v in (method.lr_scales if method else ())]
    return own + [(p, v, "train.lr_scales") for p, v in parse_lr_scales(cfg.lr_scales)]


def make_optimizer(cfg: TrainConfig, method: Optional[Method] = None,
                   optimizer: Optional[optax.GradientTransformation] = None) -> optax.GradientTransformation:
    """The optax optimizer of a run: the one described by ``cfg``, or ``optimizer`` where given, with the
    per-partition rates of ``method`` and ``cfg.lr_scales`` (:func:`lr_scale_transform`) chained after.

    Built from ``cfg`` (``optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``clip``): with a
    ``lr_schedule`` other than ``constant`` the learning rate lives in the optimizer state
    (``optax.inject_hyperparams``, the scales inside it) and :func:`fit` sets it at the start of every
    epoch (:func:`lr_at`). A user's ``optimizer`` is used as it is and those settings do not apply: it
    controls its own rate and schedule (an optax schedule counts the steps of the current task, since
    the trainer re-initialises the optimizer state at every task); ``cfg.lr_schedule`` must then be
    ``constant``. The state's structure is a function of ``cfg``, ``method`` and ``optimizer`` only,
    which is what a checkpoint is restored against (:func:`clax.checkpoint.train_state_target`).

    Raises:
      ValueError: an unknown ``cfg.optimizer``; a non-constant ``lr_schedule`` with a user optimizer.
      TypeError: ``optimizer`` is not an ``optax.GradientTransformation``.
    """
    rules = lr_scale_rules(cfg, method)
    scales = [lr_scale_transform(rules)] if rules else []
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
        if cfg.lr_schedule != "constant":
            raise ValueError(f"train.lr_schedule={cfg.lr_schedule!r} sets the rate of the optimizer clax builds; "
                             "a user optimizer controls its own (give it an optax schedule) and needs "
                             "train.lr_schedule=constant")
        return optax.chain(optimizer, *scales) if scales else optimizer
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")

    def build(learning_rate):
        if cfg.optimizer == "adam":
            tx = optax.adam(learning_rate) if not cfg.weight_decay else optax.chain(
                optax.add_decayed_weights(cfg.weight_decay), optax.adam(learning_rate))
        elif cfg.optimizer == "adamw":
            tx = optax.adamw(learning_rate, weight_decay=cfg.weight_decay)
        else:  # sgd
            tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                             optax.sgd(learning_rate, cfg.momentum or None))
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip), tx) if cfg.clip else tx
        return optax.chain(tx, *scales) if scales else tx

    if cfg.lr_schedule == "constant":  # (TrainConfig has validated the schedule)
        return build(cfg.lr)
    return optax.inject_hyperparams(build)(learning_rate=cfg.lr)


def make_context(backbone: Backbone, bench: Benchmark, scenario: str) -> Context:
    """The :class:`Context` a method factory needs for ``bench`` under ``scenario``."""
    check_scenario(scenario)
    if tuple(backbone.input_shape) != tuple(bench.input_shape):
        raise ValueError(f"backbone {backbone.name!r} expects inputs of shape {tuple(backbone.input_shape)}, "
                         f"benchmark {bench.name!r} has images of shape {tuple(bench.input_shape)}")
    cmax = bench.max_classes_per_task
    classes = np.full((bench.num_tasks, cmax), -1, np.int64)
    for t in bench.tasks:
        classes[t.task_id, :len(t.classes)] = t.classes
    return Context(backbone, bench.num_tasks, scenario, bench.num_outputs(scenario), classes,
                   tuple(bench.input_shape))


def trainable(cl: CLState, t) -> dict:
    """The differentiated part of the state: the shared partition and row ``t`` of the per-task one."""
    return {"shared": cl.shared, "task": P.task_row(cl.per_task, t)}


def with_trainable(cl: CLState, t, tr: dict) -> CLState:
    """Writes the trainable part back; other tasks' rows are left untouched."""
    return cl.replace(shared=tr["shared"], per_task=P.set_task_row(cl.per_task, t, tr["task"]))


def _where_mask(mask, tree):
    return jax.tree.map(lambda m, x: jnp.where(m, x, jnp.zeros_like(x)), mask, tree)


# metrics.csv columns the trainer writes itself: a method's loss term of one of these names is refused
RESERVED_METRICS = ("task", "epoch", "lr", "grad_norm", "seconds", "val_loss", "val_acc")


class Steps:
    """The jit-compiled train and eval steps of one method, with a count of their compilations.

    ``train_step(ts, batch, t)`` returns the new state and the step's metrics: ``loss`` (the total), the
    method's named loss terms, and ``grad_norm``, the global L2 norm (``optax.tree.norm``, which
    ``optax.global_norm`` now calls) of the gradient the optimizer receives: after the method's
    ``update_mask`` has zeroed the frozen positions, before any clipping inside the optimizer. A loss
    term named like a trainer column (:data:`RESERVED_METRICS`) is refused when the step is traced.

    ``eval_step(cl, batch, t)`` returns ``(correct, nll)``: the number of correct predictions and the sum
    of the cross-entropy of the softmax of ``predict``'s output, over the batch's real rows (weight
    ``w``); :func:`evaluate` uses the first, the validation set (:attr:`TrainConfig.val_fraction`) both.

    ``compiler_options`` (XLA options of both steps' compilation) is what :func:`fit` passes as
    :func:`clax.models.step_options` of the run's backbone: None (XLA's defaults) but for a ResNet-18 of
    ``nf >= 12`` on the CPU. Anything that must reproduce a run's predictions (``clax eval``) builds its
    steps with the same options.

    ``opt_init(cl, t)`` is the optimizer's state for task ``t``'s trainable tree and ``finite(cl, t)``
    whether every inexact leaf of it is finite, each one compiled program (exact: zeros, comparisons);
    ``finite`` is :func:`_all_finite_host`, in numpy, on a single-process CPU run."""

    def __init__(self, method: Method, tx: optax.GradientTransformation, scenario: str,
                 compiler_options: Optional[dict] = None):
        self.traces = {"train_step": 0, "eval_step": 0}

        def train_step(ts: TrainState, batch: dict, t):
            self.traces["train_step"] += 1  # runs once per trace, i.e. once per compilation
            key, sub = jax.random.split(ts.key)
            tr = trainable(ts.cl, t)

            def loss_fn(tr):
                return method.loss(with_trainable(ts.cl, t, tr), batch, sub, t)

            mask = method.update_mask(ts.cl, t) if method.update_mask else None

            def would_update(g):  # the update this step's optimizer would apply for g (state unchanged)
                g = g if mask is None else _where_mask(mask, g)
                u = tx.update(g, ts.opt_state, tr)[0]
                return u if mask is None else _where_mask(mask, u)

            with optimizer_step(would_update):  # a loss may look ahead by it (hnet.lookahead_step=optimizer)
                (loss, (state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr)
            clash = sorted(set(metrics) & set(RESERVED_METRICS))
            if clash:
                raise ValueError(f"method {method.name!r} returns a loss term named {clash[0]!r}; that name is "
                                 f"a metrics.csv column of the trainer ({', '.join(RESERVED_METRICS)})")
            if mask is not None:
                grads = _where_mask(mask, grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, ts.opt_state, tr)
            if mask is not None:
                updates = _where_mask(mask, updates)
            cl = with_trainable(ts.cl, t, optax.apply_updates(tr, updates)).replace(state=state)
            if method.on_update is not None:
                cl = method.on_update(cl, grads, updates, t)
            if method.post_update is not None:
                key, sub2 = jax.random.split(key)
                cl = method.post_update(cl, batch, sub2, t)
            return TrainState(cl, opt_state, key, ts.step + 1), {"loss": loss, **metrics, "grad_norm": grad_norm}

        # a TIL batch is one task's: a model that takes a scalar task id gets t itself (no per-row dispatch)
        one_task = method.model is not None and method.model.scalar_tid

        def eval_step(cl: CLState, batch: dict, t):
            self.traces["eval_step"] += 1
            tid = (t if one_task else jnp.full(batch["y"].shape, t, jnp.int32)) if scenario == "til" else None
            out = method.predict(cl, batch["x"], tid)
            pred = jnp.argmax(out, axis=-1)
            logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, batch["y"][:, None].astype(jnp.int32), axis=-1)[:, 0]
            return jnp.sum((pred == batch["y"]) * batch["w"]), jnp.sum(nll * batch["w"])

        self._step_fn = train_step
        self._options = compiler_options
        self._train = jax.jit(train_step, compiler_options=compiler_options)
        self.train_step = lambda ts, batch, t: self._train(ts, batch, t)
        self.eval_step = jax.jit(eval_step, compiler_options=compiler_options)
        # one compiled program each, not one eager dispatch (and compilation) per leaf shape
        def opt_init(cl, t):
            return tx.init(trainable(cl, t))

        self.opt_init = jit_init(opt_init)  # zeros: compiled at LLVM level 1 on the CPU, as inits are
        # comparisons only, exact at any level; on a single-process CPU run in numpy, uncompiled
        on_host = jax.default_backend() == "cpu" and jax.process_count() == 1
        self.finite = _all_finite_host if on_host else jit_init(_all_finite)

    def shard(self, state_shardings) -> None:
        """Compiles the train step to return the state laid out as ``state_shardings`` (a
        :class:`TrainState` of shardings, :func:`clax.mesh.state_sharding`), so that the state keeps its
        layout from step to step and the step compiles once."""
        key = (jax.tree.structure(state_shardings), tuple(jax.tree.leaves(state_shardings)))
        if getattr(self, "_layout", None) != key:  # the same layout again (another run): keep the compiled step
            self._layout = key
            self._train = jax.jit(self._step_fn, out_shardings=(state_shardings, None),
                                  compiler_options=self._options)

    @property
    def compiles(self) -> int:
        """How many times the train and eval steps were traced (``timing.step_traces``; each trace
        compiles once). Every XLA compilation of a run, eager ones included, is ``timing.compiles``
        (:class:`clax.metrics.CompileCounter`)."""
        return sum(self.traces.values())


def eval_batch_rows(bench: Benchmark, batch_size: int, mesh=None) -> int:
    """The rows of every test batch of ``bench``: ``batch_size``, or, where every task's test set is
    smaller, the largest test set rounded up to a multiple of 8 (and of the mesh's ``data`` axis).

    One size for every task (one compiled eval step); a split-digits task's 72 test images take one
    batch of 72, not 256 rows of which 184 are padding. ``batch_size`` (``train.eval_batch_size``) is
    thus the most rows a test batch has."""
    step = math.lcm(8, mesh.shape["data"] if mesh is not None else 1)
    largest = max(len(t.y_test) for t in bench.tasks)
    return min(batch_size, -(-largest // step) * step)


def evaluate(steps: Steps, cl: CLState, bench: Benchmark, scenario: str, c: int, batch_size: int,
             mesh=None) -> float:
    """Test accuracy of ``cl`` on task ``c`` (batches split along the mesh's data axis where given), in
    batches of :func:`eval_batch_rows` rows (at most ``batch_size``)."""
    task = bench.tasks[c]
    y = task.targets(task.y_test, scenario)
    put = (lambda b: M.put_batch(b, mesh)) if mesh is not None else (lambda b: b)
    rows = eval_batch_rows(bench, batch_size, mesh)
    correct = sum(steps.eval_step(cl, put(b), jnp.int32(c))[0] for b in eval_batches(task.x_test, y, rows))
    return float(correct) / len(y)


def _rows(x, idx: np.ndarray):
    """Rows ``idx`` of an array or of a lazy image source (:class:`clax.data.pipeline.ImageSource`)."""
    return x[idx] if isinstance(x, np.ndarray) else x.take(idx)


def task_training_data(bench: Benchmark, r: int, scenario: str, cumulative: bool, splits: Optional[list] = None):
    """``(x, targets, tid)`` of task ``r``, or of tasks ``0..r`` for cumulative (joint) training; with
    ``splits`` (:func:`validation_splits`) only each task's training rows, its validation rows left out."""
    tasks = bench.tasks[: r + 1] if cumulative else [bench.tasks[r]]
    if splits is None:
        x = np.concatenate([t.x_train for t in tasks])
        y = np.concatenate([t.targets(t.y_train, scenario) for t in tasks])
        tid = np.concatenate([np.full(len(t.y_train), t.task_id, np.int32) for t in tasks])
        return x, y, tid
    rows = [splits[c][0] for c in (range(r + 1) if cumulative else [r])]
    x = np.concatenate([_rows(t.x_train, i) for t, i in zip(tasks, rows)])
    y = np.concatenate([t.targets(np.asarray(t.y_train)[i], scenario) for t, i in zip(tasks, rows)])
    tid = np.concatenate([np.full(len(i), t.task_id, np.int32) for t, i in zip(tasks, rows)])
    return x, y, tid


def validation_data(bench: Benchmark, r: int, scenario: str, cumulative: bool, splits: list) -> list:
    """``[(task, x, targets)]``: the held-out rows (:func:`validation_splits`) of task ``r``, or of each of
    tasks ``0..r`` for cumulative training, without augmentation (a lazy image source's is turned off)."""
    out = []
    for c in (range(r + 1) if cumulative else [r]):
        t, i = bench.tasks[c], splits[c][1]
        x = _rows(t.x_train, i)
        if hasattr(x, "with_augment"):
            x = x.with_augment(False)
        out.append((t.task_id, x, t.targets(np.asarray(t.y_train)[i], scenario)))
    return out


def validate(steps: Steps, cl: CLState, sets: list, batch_size: int, mesh=None) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``cl`` on the validation sets ``[(task, x, targets)]`` of
    :func:`validation_data`: the mean cross-entropy and the fraction correct over all their rows, each
    task's rows predicted as task ``task`` (TIL), by the compiled eval step (no new compilation: ``fit``
    passes ``batch_size`` = :func:`eval_batch_rows`, the test batches' size)."""
    put = (lambda b: M.put_batch(b, mesh)) if mesh is not None else (lambda b: b)
    correct, nll, n = 0, 0, 0
    for c, x, y in sets:
        for b in eval_batches(x, y, batch_size):
            k, l = steps.eval_step(cl, put(b), jnp.int32(c))
            correct, nll = correct + k, nll + l
        n += len(y)
    return float(nll) / n, float(correct) / n


def _stream(batches, x):
    """``batches``, computed ahead in a background thread when ``x`` is a lazy image source
    (:class:`clax.data.pipeline.ImageSource`: decoding overlaps the compiled step); arrays as they are."""
    if isinstance(x, np.ndarray):
        return batches
    from clax.data.pipeline import prefetch

    return prefetch(batches)


def count_params(cl: CLState, backbone_count: int, num_tasks: int, method: Method) -> dict:
    """Parameter counts per partition, trainable parameters and bytes added per task."""
    row = P.count(cl.per_task) // max(num_tasks, 1)
    row_bytes = P.nbytes(cl.per_task) // max(num_tasks, 1)
    extra = [method.task_bytes(cl, t) if method.task_bytes else 0 for t in range(num_tasks)]
    return {
        "backbone": backbone_count,
        "partitions": {n: P.count(getattr(cl, n)) for n in P.PARTITIONS},
        "per_task": [row] * num_tasks,
        "bytes_per_task": [row_bytes + e for e in extra],
    }


def _all_finite(cl: CLState, t) -> jax.Array:
    """Whether every inexact leaf of task ``t``'s trainable tree is finite (True for none)."""
    leaves = [x for x in jax.tree.leaves(trainable(cl, t)) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def _all_finite_host(cl: CLState, t) -> bool:
    """:func:`_all_finite` in numpy: on a single-process CPU run the arrays are already in host memory,
    and a check there needs no compilation (the compiled one took 0.2-0.5 s per run to compile)."""
    tr = {"shared": cl.shared, "task": jax.tree.map(lambda a: np.asarray(a)[int(t)], cl.per_task)}
    leaves = [np.asarray(x) for x in jax.tree.leaves(tr) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return all(np.isfinite(x if x.dtype.itemsize >= 4 else x.astype(np.float32)).all() for x in leaves)


def _check_finite(ts: TrainState, t, losses: list, r: int, epoch: int, per_epoch: int, finite: Callable) -> None:
    """Raises :class:`NonFiniteLossError` naming task ``r`` and the step if a loss of the current epoch
    (``losses``) or a trained parameter (``finite``, :attr:`Steps.finite`) is NaN or infinite."""
    arr = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
    if not np.isfinite(arr).all():
        bad = int(np.argmax(~np.isfinite(arr)))
        raise NonFiniteLossError(f"non-finite loss ({arr[bad]}) in task {r}, epoch {epoch}, "
                                 f"step {epoch * per_epoch + bad} of the task")
    if not bool(finite(ts.cl, t)):
        raise NonFiniteLossError(f"non-finite parameters in task {r} after step "
                                 f"{epoch * per_epoch + len(losses)} of the task")


def _append(acc: dict, m: dict) -> None:
    """Adds one step's metrics ``m`` (device scalars, no host sync) to the epoch's lists ``acc``."""
    for k, v in m.items():
        acc.setdefault(k, []).append(v)


def _epoch_means(acc: dict) -> dict:
    """The epoch's mean of every metric in ``acc`` (name -> per-step values), one transfer to the host.

    A metric with fewer values than ``loss`` (an epoch resumed from a checkpoint that did not record it)
    has no mean: a mean over part of an epoch is left out rather than written."""
    n = len(acc["loss"])
    means = {k: jnp.mean(jnp.stack([jnp.asarray(x, jnp.float32) for x in v])) for k, v in acc.items()
             if len(v) == n}
    return {k: float(v) for k, v in jax.device_get(means).items()}


def fit(
    method: Method,
    ctx: Context,
    bench: Benchmark,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_task_end: Optional[Callable[[int, TrainState, np.ndarray], None]] = None,
    log: Optional[Callable[[dict], None]] = None,
    on_epoch_end: Optional[Callable[[int, int, TrainState], None]] = None,
    resume: Optional[tuple[TrainState, Progress]] = None,
    checkpoint: Optional[Callable[[TrainState, Progress], None]] = None,
    checkpoint_every: int = 0,
    optimizer: Optional[optax.GradientTransformation] = None,
    mesh=None,
    shard_min_size: int = M.MESH_DEFAULTS["shard_min_size"],
    shard: str = "",
) -> dict:
    """Trains ``method`` through every task of ``bench`` and evaluates after each.

    Args:
      method: the method, built for ``ctx``.
      ctx: the stream's context (see :func:`make_context`).
      bench: the benchmark.
      cfg: the training loop's settings.
      progress: show a progress bar per task.
      on_task_end: called as ``(t, train_state, accuracy_matrix)`` after each task is evaluated
        (checkpointing hooks in here).
      log: called with a row dict per task and epoch: ``task``, ``epoch``, the epoch's mean ``loss`` and
        mean of each of the method's named loss terms (e.g. ``ce``, ``kl``), ``lr`` (the learning rate of
        the epoch, :func:`lr_at`; the base rate, which ``lr_scales`` multiply per partition; absent with a
        user's ``optimizer``, which schedules its own), ``grad_norm`` (the epoch's mean global norm of the
        gradient the optimizer receives, after the method's update mask, before clipping; see
        :class:`Steps`), with ``train.val_fraction > 0`` ``val_loss`` and ``val_acc`` (on the task's
        held-out rows after the epoch's ``end_epoch`` hook; :func:`validate`), and ``seconds`` (since
        the task's training started). Under ``plateau`` ``lr`` is the rate the epoch trained with.
      on_epoch_end: called as ``(task, epoch, train_state)`` after each epoch's ``log`` row and before a
        checkpoint on the epoch's last step; it must not change the run (it sees the state, returns nothing).
      resume: ``(train_state, progress)`` of a checkpoint: training continues from there and ends as
        an uninterrupted run would (the data order is a function of seed, task and epoch only).
      checkpoint: called as ``(train_state, progress)`` after each task is evaluated and, when
        ``checkpoint_every > 0``, every that many steps inside a task (one on an epoch's last step after
        that epoch's ``end_epoch`` hook and ``log`` row, so that resuming from it starts the next
        epoch); a non-finite loss or parameter raises :class:`NonFiniteLossError` before a bad state
        reaches it. Resuming from any of these ends exactly as the uninterrupted run (state, accuracies,
        losses and ``log`` rows; only wall-clock seconds and compile counts differ).
      optimizer: an optax ``GradientTransformation`` that replaces the one ``cfg`` describes (``cfg``'s
        ``optimizer``, ``lr``, ``weight_decay``, ``momentum`` and ``clip`` then do not apply, and
        ``lr_schedule`` must be ``constant``: the optimizer controls its own rate and schedule). Its state
        is re-initialised at every task like the built one's; the per-partition rates
        (:attr:`TrainConfig.lr_scales` and the method's own) are chained after it
        (:func:`make_optimizer`). To resume, restore the checkpoint against the same optimizer.
      mesh: the :class:`jax.sharding.Mesh` to train on (:mod:`clax.mesh`); default every device as the
        ``data`` axis. Each batch is split along ``data`` (``cfg.batch_size`` and ``cfg.eval_batch_size``
        must be multiples of it), the state replicated, leaves of at least ``shard_min_size`` values
        split over ``model`` when it is larger than 1, as are leaves whose path matches the regular
        expression ``shard`` (:func:`clax.mesh.state_sharding`). The data order does not depend on the mesh.

    Returns:
      A dict with ``accuracy_matrix`` (T x T, NaN where not evaluated), ``init_accuracy``, the metrics
      of :func:`clax.metrics.summarize`, ``params`` and ``timing``; ``history``, the rows given to
      ``log`` (one per epoch trained by this call); ``state``, the final :class:`TrainState`; and with
      ``cfg.val_fraction > 0`` ``task_training``, per task ``{"task", "epochs" (run), "best_epoch",
      "stopped"}`` where ``stopped`` is ``epochs`` (all ran), ``plateau_floor`` or ``early_stop``.

    Validation, plateau, early stopping and best-state restore (:class:`TrainConfig`): the validation
    rows of every task are drawn first (:func:`validation_splits`; a bad ``val_fraction`` fails before
    any training); the task's :class:`ValState` and best state travel in every checkpoint inside the
    task, so a resume from any of them ends as the uninterrupted run.
    """
    from tqdm.auto import tqdm

    scenario, T = ctx.scenario, bench.num_tasks
    mesh = M.make_mesh() if mesh is None else mesh
    M.check_batch(mesh, cfg.batch_size)
    M.check_batch(mesh, cfg.eval_batch_size, "train.eval_batch_size")
    tx = make_optimizer(cfg, method, optimizer)
    compiled = CompileCounter()  # every XLA compilation of the run from here on: timing["compiles"]
    steps = Steps(method, tx, scenario, step_options(ctx.backbone))
    layout: list = []  # the TrainState's shardings, made once from its first value

    # In a multi-process run the host-side hooks see the state as NumPy (the same in every process) and
    # their result is laid out on the mesh again; in one process they see it as it is.
    host = M.to_host if jax.process_count() > 1 else (lambda tree: tree)

    def place(ts: TrainState) -> TrainState:
        """``ts`` on the mesh (after init, resume and every host-side hook)."""
        if not layout:
            layout.append(M.state_sharding(ts, mesh, shard_min_size, shard))
            steps.shard(layout[0])
        return M.place(ts, layout[0])
    key = jax.random.PRNGKey(cfg.seed)
    key, k_init = jax.random.split(key)
    if resume is None:
        cl = jit_init(method.init)(k_init)  # one compilation, not one per eager operation of the init
        P.check(cl, T)
        ts = place(TrainState(cl, steps.opt_init(cl, jnp.int32(0)), key, jnp.zeros((), jnp.int32)))
    else:  # the resumed state replaces the initial one: not computed
        P.check(resume[0].cl, T)
    backbone_count = P.count(jax.eval_shape(ctx.backbone.init, jax.random.PRNGKey(0))[0])  # shapes only

    A = np.full((T, T), np.nan)
    b = None
    eval_rows = eval_batch_rows(bench, cfg.eval_batch_size, mesh)  # validation batches: the eval step's shape
    if resume is None and method.evaluates_unseen:
        b = np.array([evaluate(steps, ts.cl, bench, scenario, c, cfg.eval_batch_size, mesh) for c in range(T)])
    train_s, n_steps, compiles_after_task = 0.0, 0, []
    start, skip = 0, 0
    if resume is not None:
        ts, pr = resume
        ts = place(ts)
        A, b, start, skip = np.array(pr.accuracy_matrix, np.float64), pr.init_accuracy, pr.tasks_done, pr.task_step
        train_s, n_steps = pr.train_s, pr.steps - len(pr.epoch_metrics.get("loss", []))
        compiles_after_task = list(pr.compiles_after_task)
    history: list[dict] = []
    # the validation split (train.val_fraction): labels only, every task's checked before any training
    splits = validation_splits(bench, cfg.val_fraction, cfg.seed) if cfg.val_fraction else None
    records = list(resume[1].task_records) if resume is not None else []  # per finished task (with splits)
    plateau = parse_plateau(cfg.lr_schedule)
    for r in range(start, T):
        x, y, tid = task_training_data(bench, r, scenario, method.cumulative, splits)
        vsets = validation_data(bench, r, scenario, method.cumulative, splits) if splits else []
        t = jnp.int32(r)
        done = skip if r == start else 0  # steps of this task already taken (resuming inside it)
        vs, best_cl = ValState(cfg.lr), None  # the task's validation state and best-epoch method state
        if done:
            k_end = jnp.asarray(resume[1].task_key)
            if resume[1].val is not None:
                vs, best_cl = ValState(**resume[1].val), resume[1].best_cl
        else:
            key, k_begin, k_end = jax.random.split(ts.key, 3)
            cl = method.begin_task(host(ts.cl), TaskData(r, x, y, k_begin, cfg.batch_size))
            ts = place(TrainState(cl, steps.opt_init(cl, t), key, ts.step))
        if method.train_filter is not None:  # e.g. PAH: drop the images its prototypes came from
            keep = np.asarray(method.train_filter(TaskData(r, x, y, k_end, cfg.batch_size)))
            x, y, tid = (x[keep] if isinstance(x, np.ndarray) else x.take(keep)), y[keep], tid[keep]
        per_epoch = max(1, -(-len(y) // cfg.batch_size))

        def due(s: int) -> bool:  # an in-task checkpoint after step s of the task (the task-end one is below)
            return bool(checkpoint and checkpoint_every and s % checkpoint_every == 0 and s < cfg.epochs * per_epoch)

        bar = tqdm(total=cfg.epochs * per_epoch, initial=done, desc=f"{method.name} task {r + 1}/{T}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        def val_progress() -> dict:  # the Progress fields of the task's validation state (mid-task)
            return {"val": dataclasses.asdict(vs), "best_cl": best_cl} if splits else {}

        for epoch in range(done // per_epoch, cfg.epochs):
            if vs.stop:  # stopped by the plateau floor or early stopping (a resume after its last epoch)
                break
            lr = vs.lr if plateau else lr_at(cfg, epoch)  # the epoch's rate
            if cfg.lr_schedule != "constant":
                ts = place(ts.replace(opt_state=set_lr(ts.opt_state, lr)))
            # The data order depends on (seed, task, epoch) only, so a resumed run sees the same batches.
            rng = np.random.default_rng([cfg.seed, r, epoch])
            acc = ({k: [jnp.float32(v) for v in vals] for k, vals in resume[1].epoch_metrics.items()}
                   if done and epoch == done // per_epoch else {})  # metric name -> the epoch's step values
            acc.setdefault("loss", [])
            losses = acc["loss"]
            for i, batch in enumerate(_stream(train_batches(x, y, cfg.batch_size, rng, tid), x)):
                s = epoch * per_epoch + i + 1  # steps of the task after this one
                if s <= done:
                    continue
                ts, m = steps.train_step(ts, M.put_batch(batch, mesh), t)
                _append(acc, m)
                bar.update(1)
                # A checkpoint on the epoch's last step waits for the epoch's end (below), so that it holds
                # the epoch's end_epoch hook, mean loss and metrics row, and a resumed run starts the next
                # epoch as the uninterrupted run does.
                if due(s) and s % per_epoch:
                    _check_finite(ts, t, losses, r, epoch, per_epoch, steps.finite)
                    checkpoint(ts, Progress(r, s, A.copy(), b, train_s + time.perf_counter() - t0, int(ts.step),
                                            list(compiles_after_task), k_end,
                                            {k: [float(v) for v in vals] for k, vals in acc.items()},
                                            task_records=list(records), **val_progress()))
            means = _epoch_means(acc)
            mean_loss = means.pop("loss")
            n_steps += len(losses)
            if not np.isfinite(mean_loss):
                bar.close()
                _check_finite(ts, t, losses, r, epoch, per_epoch, steps.finite)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if method.end_epoch is not None:
                ts = place(ts.replace(cl=method.end_epoch(host(ts.cl), TaskData(r, x, y, k_end, cfg.batch_size), epoch)))
            val = {}
            if splits:  # the held-out rows, by the compiled eval step; then the plateau / early-stop rule
                val_loss, val_acc = validate(steps, ts.cl, vsets, eval_rows, mesh)
                vs = val_update(vs, val_loss if cfg.val_metric == "loss" else val_acc, epoch, cfg)
                if cfg.restore_best and vs.best_epoch == epoch:
                    best_cl = ts.cl  # arrays are immutable and no step donates its input: a reference suffices
                val = {"val_loss": val_loss, "val_acc": val_acc}
            grad_norm = means.pop("grad_norm", None)
            row = {"task": r, "epoch": epoch, "loss": mean_loss, **dict(sorted(means.items())), **val,
                   **({"lr": lr} if optimizer is None else {}),  # a user's: its own schedule
                   **({} if grad_norm is None else {"grad_norm": grad_norm}), "seconds": time.perf_counter() - t0}
            history.append(row)
            if log:
                log(dict(row))
            if on_epoch_end:  # after the row, before an epoch-end checkpoint (clax.tracking's hook)
                on_epoch_end(r, epoch, ts)
            s = (epoch + 1) * per_epoch
            if due(s) and not vs.stop:  # the epoch's last step, its epoch finished: the next epoch starts here
                # (a task that stops here has its task-end checkpoint at this same step instead)
                _check_finite(ts, t, [], r, epoch + 1, per_epoch, steps.finite)
                checkpoint(ts, Progress(r, s, A.copy(), b, train_s + time.perf_counter() - t0, n_steps,
                                        list(compiles_after_task), k_end, {}, task_records=list(records),
                                        **val_progress()))
        bar.close()
        if splits:
            records.append({"task": r, "epochs": vs.epochs, "best_epoch": vs.best_epoch, "stopped": vs.stop or "epochs"})
            if cfg.restore_best and best_cl is not None:  # before end_task: the best epoch's whole method state
                ts = place(ts.replace(cl=best_cl))
        ts = place(ts.replace(cl=method.end_task(host(ts.cl), TaskData(r, x, y, k_end, cfg.batch_size))))
        jax.block_until_ready(ts)
        train_s += time.perf_counter() - t0
        last = r + 1 if (method.evaluates_unseen and r + 1 < T) else r
        for c in range(last + 1):
            A[r, c] = evaluate(steps, ts.cl, bench, scenario, c, cfg.eval_batch_size, mesh)
        compiles_after_task.append(steps.compiles)
        if on_task_end:
            on_task_end(r, ts, A)
        if checkpoint:
            _check_finite(ts, t, [], r, cfg.epochs, per_epoch, steps.finite)
            checkpoint(ts, Progress(r + 1, 0, A.copy(), b, train_s, n_steps, list(compiles_after_task),
                                    task_records=list(records)))

    def test_accuracy(cl: CLState, c: int) -> float:
        """Task ``c``'s test accuracy of ``cl`` by the compiled eval step (the test reports' evaluator)."""
        return evaluate(steps, place(ts.replace(cl=cl)).cl, bench, scenario, c, cfg.eval_batch_size, mesh)

    out = summarize(A, b, scenario)  # FWT None in CIL (clax.metrics.FWT_SCENARIOS)
    out.update(
        accuracy_matrix=A,
        init_accuracy=b,
        params=count_params(ts.cl, backbone_count, T, method),
        timing={"train_s": train_s, "steps": n_steps, "compiles": compiled.count, "compile_s": compiled.seconds,
                "compile_cache_hits": compiled.cache_hits, "step_traces": steps.compiles, "traces": dict(steps.traces),
                "compiles_after_task": compiles_after_task},
        history=history,
        **({"task_training": records} if splits else {}),
        state=ts,
        devices={**M.describe(mesh), "bytes_per_device": max(M.bytes_per_device(ts).values(), default=0)},
        report={**(method.report(ts.cl) if method.report else {}),
                **(method.test_report(ts.cl, bench, test_accuracy) if method.test_report else {})},
    )
    return out
