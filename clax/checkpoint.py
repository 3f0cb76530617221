"""Orbax checkpoints of the whole trainer state, and the resumption of a run from them.

A workdir holds ``checkpoints/<step>/`` written by an Orbax ``CheckpointManager`` (``step`` is the
global train step). Each checkpoint has three items:

* ``state``: the :class:`~clax.train.TrainState` as a nested dict
  (:func:`flax.serialization.to_state_dict`: method state in its partitions, optimizer state, RNG key,
  step), the accuracy matrix so far, the initial accuracies, ``task`` (the last finished task, -1 if
  none), ``task_key`` (the current task's hook key) and, inside a task with ``train.restore_best``,
  ``best_cl`` (the method state of the task's best-validation epoch so far);
* ``config``: the run's config (JSON);
* ``meta``: JSON with the clax version, ``task`` (the task the checkpoint belongs to), ``task_end``
  (whether it was written at the end of that task, after ``end_task`` and the evaluation),
  ``tasks_done``, ``task_step`` (steps taken inside task ``tasks_done``; at an epoch's last step the
  checkpoint comes after that epoch's ``end_epoch`` hook and metrics row), timing so far, the current
  epoch's metrics so far (``epoch_metrics``: every metric's per-step values, by name), inside a task
  with ``train.val_fraction`` its validation state (``val``: the plateau's rate, patience count, best
  value and epoch, stop), the finished tasks' training records (``task_records``), the metrics
  rows and a CRC-32 of every array of ``state``, so that a corrupted
  checkpoint is recognised even where Orbax reads it.

Every task-end checkpoint is kept (:func:`task_checkpoint` reads task N's); of the checkpoints inside
tasks (``checkpoint.every_steps``) the newest ``checkpoint.keep`` are (:class:`KeepTaskEnds`).

Saving is asynchronous: :func:`save_progress` returns once the arrays are on the host and Orbax writes
them in the background; a checkpoint becomes visible only once complete, so a killed run leaves at
worst an unfinished temporary directory, which the next manager removes. :func:`latest_intact` walks
back from the newest checkpoint to the newest readable one and moves unreadable ones to
``checkpoints.corrupt/`` (never deletes them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import weakref
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from flax.traverse_util import flatten_dict

ITEMS = ("state", "config", "meta")


def clax_version() -> str:
    """The installed clax version (``"unknown"`` when clax is not installed as a package)."""
    try:
        from importlib.metadata import version
        return version("clax")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "unknown"


def checkpoint_dir(workdir: str) -> str:
    """``workdir/checkpoints`` as an absolute path."""
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _meta_file(workdir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(workdir), str(step), "meta", "metadata")


def is_task_end(meta: dict) -> bool:
    """Whether a checkpoint's ``meta`` is that of a task-end checkpoint (written after a task's
    ``end_task`` and evaluation), not one inside a task."""
    return int(meta.get("task_step", -1)) == 0 and int(meta.get("tasks_done", 0)) > 0


def task_of(meta: dict) -> int:
    """The task a checkpoint belongs to: the finished task of a task-end checkpoint, the task in
    progress of one inside a task (``meta["task"]``; derived for checkpoints written before it)."""
    if "task" in meta:
        return int(meta["task"])
    return int(meta["tasks_done"]) - (1 if is_task_end(meta) else 0)


def task_checkpoints(workdir: str) -> dict[int, int]:
    """``{task: step}`` of the task-end checkpoints in ``workdir`` (read from their metadata files,
    without Orbax; a checkpoint whose metadata cannot be read is left out)."""
    out: dict[int, int] = {}
    d = checkpoint_dir(workdir)
    for name in sorted(os.listdir(d), key=lambda n: int(n) if n.isdigit() else -1) if os.path.isdir(d) else []:
        if not name.isdigit():
            continue
        try:
            with open(_meta_file(workdir, int(name))) as f:
                meta = json.load(f)
            if is_task_end(meta):
                out[task_of(meta)] = int(name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


@dataclasses.dataclass
class KeepTaskEnds:
    """An Orbax preservation policy: every task-end checkpoint (the steps in ``task_ends``) is kept, and
    of the others (inside a task) the newest ``keep``."""

    keep: int
    task_ends: set

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        """One bool per checkpoint info (``.step``): whether to keep it."""
        inside = sorted(c.step for c in checkpoints if c.step not in self.task_ends)
        recent = set(inside[len(inside) - self.keep:]) if self.keep > 0 else set()
        return [c.step in self.task_ends or c.step in recent for c in checkpoints]


_POLICIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over ``workdir/checkpoints`` that keeps every task-end checkpoint
    and the newest ``keep`` checkpoints inside a task (:class:`KeepTaskEnds`; older ones are deleted
    once a newer one is complete).

    Unfinished temporary checkpoints (left by a killed run) are removed unless ``read_only``.
    """
    if read_only:
        return ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(
            create=False, read_only=True, cleanup_tmp_directories=False))
    policy = KeepTaskEnds(int(keep), set(task_checkpoints(workdir).values()))
    mngr = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=True, cleanup_tmp_directories=True))
    _POLICIES[mngr] = policy
    return mngr


def checksum(item: dict) -> str:
    """CRC-32 (hex) over the path, dtype, shape and bytes of every array of a nested dict."""
    crc = 0
    for path, leaf in sorted(flatten_dict(item, sep="/").items()):
        a = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(f"{path}|{a.dtype.str}|{a.shape}".encode(), crc)
        crc = zlib.crc32(a.tobytes(), crc)
    return f"{crc:08x}"


def save(mngr: ocp.CheckpointManager, step: int, train_state: Any, accuracy_matrix: np.ndarray,
         task: int, config: dict) -> None:
    """Saves the trainer state after finishing ``task`` at global ``step``; waits until it is on disk."""
    from clax.train import Progress
    save_progress(mngr, train_state, Progress(task + 1, 0, accuracy_matrix, None, steps=int(step)), config)
    mngr.wait_until_finished()


def save_progress(mngr: ocp.CheckpointManager, train_state: Any, progress: Any, config: dict,
                  rows: Optional[list] = None) -> int:
    """Saves a :class:`~clax.train.TrainState` with its :class:`~clax.train.Progress` at the global
    step ``train_state.step``; returns that step. The write finishes in the background.

    A task-end checkpoint (``progress.task_step == 0``) is marked ``task_end`` in its metadata and, with a
    manager from :func:`manager`, kept for good; ``rows`` are the metrics rows so far (restored on resume).
    """
    step = int(train_state.step)
    from clax.mesh import to_host

    key = np.asarray(to_host(train_state.key))
    b = progress.init_accuracy
    item = to_host({
        "train_state": serialization.to_state_dict(train_state),
        "accuracy_matrix": np.asarray(progress.accuracy_matrix, np.float64),
        # Orbax refuses zero-size arrays: a method without initial accuracies stores NaNs (see meta)
        "init_accuracy": np.full(np.shape(progress.accuracy_matrix)[:1], np.nan) if b is None
        else np.asarray(b, np.float64),
        "task": np.asarray(progress.tasks_done - 1, np.int32),
        "task_key": np.zeros_like(key) if progress.task_key is None else np.asarray(progress.task_key),
        **({} if getattr(progress, "best_cl", None) is None else
           {"best_cl": serialization.to_state_dict(progress.best_cl)}),
    })
    task_end = int(progress.task_step) == 0 and int(progress.tasks_done) > 0
    meta = {
        "clax_version": clax_version(),
        "step": step,
        "task": int(progress.tasks_done) - 1 if task_end else int(progress.tasks_done),
        "task_end": task_end,
        "tasks_done": int(progress.tasks_done),
        "task_step": int(progress.task_step),
        "num_tasks": int(np.shape(progress.accuracy_matrix)[0]),
        "has_init_accuracy": b is not None,
        "train_s": float(progress.train_s),
        "steps": int(progress.steps),
        "compiles_after_task": [int(c) for c in progress.compiles_after_task],
        "epoch_metrics": {k: [float(v) for v in vs] for k, vs in progress.epoch_metrics.items()},
        **({} if getattr(progress, "val", None) is None else {"val": dict(progress.val)}),
        **({"task_records": [dict(r) for r in progress.task_records]} if getattr(progress, "task_records", None)
           else {}),
        "rows": [dict(r) for r in (rows or [])],
        "checksum": checksum(item),
    }
    if task_end and mngr in _POLICIES:  # before save(), which applies the policy
        _POLICIES[mngr].task_ends.add(step)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(item),
                                            config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta)))
    return step


def restore_raw(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """``(state item as nested dict of arrays, config)`` of ``step`` (default: the latest)."""
    mngr = manager(workdir, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     config=ocp.args.JsonRestore()))
    return out["state"], out["config"]


def _say(msg: str) -> None:
    print(f"clax: {msg}", file=sys.stderr, flush=True)


def _quiet_closed_loop_errors() -> None:
    """When a TensorStore read fails, Orbax closes its event loop while other reads still hold
    callbacks, and each reports an unraisable ``RuntimeError('Event loop is closed')`` as a traceback
    on stderr; the failure itself is reported by :func:`read`, so those are dropped (others pass)."""
    prev = sys.unraisablehook
    if getattr(prev, "_clax_quiet", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
            return
        prev(u)

    hook._clax_quiet = True
    sys.unraisablehook = hook


def read(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, dict, dict]:
    """``(state, config, meta)`` of one checkpoint, its checksum verified.

    Raises:
      ValueError: the checkpoint cannot be read or its arrays do not match the recorded checksum.
    """
    _quiet_closed_loop_errors()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         config=ocp.args.JsonRestore(),
                                                         meta=ocp.args.JsonRestore()))
        state, config, meta = out["state"], out["config"], out["meta"]
        if not isinstance(meta, dict) or not isinstance(config, dict):
            raise ValueError("its config or metadata is missing")
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        raise ValueError(f"{type(e).__name__}: {msg}") from None
    state = jax.tree.map(np.asarray, state)
    if checksum(state) != meta.get("checksum"):
        raise ValueError("its arrays do not match the checksum recorded when it was saved")
    return state, config, meta


def latest_intact(workdir: str, read_only: bool = False,
                  say: Callable[[str], None] = _say) -> Optional[tuple[int, dict, dict, dict]]:
    """``(step, state, config, meta)`` of the newest readable checkpoint of ``workdir``, or None.

    An unreadable checkpoint is reported through ``say`` (naming its step and the one fallen back to)
    and, unless ``read_only``, moved to ``checkpoints.corrupt/<step>`` so that training can write that
    step again; nothing is deleted.
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    mngr = manager(workdir, read_only=True)
    steps = sorted(mngr.all_steps(), reverse=True)
    bad = []
    for i, step in enumerate(steps):
        try:
            state, config, meta = read(mngr, step)
        except ValueError as e:
            nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint is left"
            say(f"checkpoint step {step} in {checkpoint_dir(workdir)} is unreadable ({e}); {nxt}")
            bad.append(step)
            continue
        break
    else:
        state = None
    mngr.close()
    if bad and not read_only:
        dest = checkpoint_dir(workdir) + ".corrupt"
        os.makedirs(dest, exist_ok=True)
        for step in bad:
            src = os.path.join(checkpoint_dir(workdir), str(step))
            if os.path.isdir(src):
                target = os.path.join(dest, str(step))
                n = 1
                while os.path.exists(target):
                    target, n = os.path.join(dest, f"{step}.{n}"), n + 1
                os.rename(src, target)
                say(f"moved the unreadable checkpoint to {target}")
    if state is None:
        return None
    return step, state, config, meta


def task_checkpoint(workdir: str, task: int,
                    say: Callable[[str], None] = _say) -> Optional[tuple[int, dict, dict, dict]]:
    """``(step, state, config, meta)`` of the checkpoint written at the end of task ``task`` (its checksum
    verified), or None where ``workdir`` holds none for that task (not finished yet, or written by a
    clax that rolled task-end checkpoints away) or it is unreadable (reported through ``say``).
    Reads only: nothing is moved or written."""
    step = task_checkpoints(workdir).get(int(task))
    if step is None:
        return None
    mngr = manager(workdir, read_only=True)
    try:
        state, config, meta = read(mngr, step)
    except ValueError as e:
        say(f"the checkpoint of task {task} (step {step}) in {checkpoint_dir(workdir)} is unreadable ({e})")
        return None
    finally:
        mngr.close()
    return step, state, config, meta


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_diff(saved: dict, now: dict, ignore: tuple = ("checkpoint", "mesh")) -> list[str]:
    """Dotted keys whose values differ between two configs, as ``"key: saved X, now Y"``; sections in
    ``ignore`` (checkpointing settings and the mesh, which change no result beyond the order of
    floating-point reductions) are skipped."""
    a = _flat({k: v for k, v in saved.items() if k not in ignore})
    b = _flat(json.loads(json.dumps({k: v for k, v in now.items() if k not in ignore})))
    missing = object()
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            fa = "(absent)" if va is missing else json.dumps(va)
            fb = "(absent)" if vb is missing else json.dumps(vb)
            out.append(f"{k}: saved {fa}, now {fb}")
    return out


def train_state_target(method, tx) -> Any:
    """The shapes and dtypes of a :class:`~clax.train.TrainState` of ``method`` and optimizer ``tx``
    (``jax.eval_shape`` of ``method.init`` and ``tx.init``; no array is made)."""
    from clax.train import TrainState, trainable

    def make(key):
        cl = method.init(key)
        return TrainState(cl, tx.init(trainable(cl, 0)), key, jnp.zeros((), jnp.int32))

    return jax.eval_shape(make, jax.random.PRNGKey(0))


def merged_trailing(saved, want) -> bool:
    """Whether shape ``want`` is shape ``saved`` with its trailing axes (two or more) merged into one."""
    saved, want = tuple(saved), tuple(want)
    k = len(want) - 1
    return (len(saved) > len(want) >= 1 and saved[:k] == want[:k]
            and int(np.prod(saved[k:], dtype=np.int64)) == want[-1])


def restore_train_state(raw: dict, method, tx) -> Any:
    """A :class:`~clax.train.TrainState` from its saved nested dict, with the structure, shapes and
    dtypes that ``method`` and ``tx`` build.

    A leaf saved with trailing axes that ``method`` now keeps merged into one (a layout of an earlier
    clax: PAH's prototype table was ``[T, C, s, s, ch]``, now ``[T, C, s * s * ch]``, as are its optimizer
    moments) is reshaped, row-major: the same numbers, so such a run resumes.

    Raises:
      ValueError: the saved state does not have the structure or shapes of ``method``'s state.
    """
    target = train_state_target(method, tx)
    try:
        ts = serialization.from_state_dict(target, raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the checkpoint does not hold a state of method {method.name!r}: {e}") from None
    t_leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    leaves, treedef = jax.tree.flatten(ts)
    if len(leaves) != len(t_leaves):
        raise ValueError(f"the checkpoint holds {len(leaves)} arrays; method {method.name!r} has {len(t_leaves)}")
    out = []
    for (path, t), a in zip(t_leaves, leaves):
        if merged_trailing(np.shape(a), t.shape):
            a = np.reshape(np.asarray(a), t.shape)
        if tuple(np.shape(a)) != tuple(t.shape):
            raise ValueError(f"checkpoint leaf {jax.tree_util.keystr(path)} has shape {tuple(np.shape(a))}; "
                             f"method {method.name!r} expects {tuple(t.shape)}")
        out.append(jnp.asarray(a, dtype=t.dtype))
    return jax.tree.unflatten(jax.tree.structure(target), out)


def progress_from(state: dict, meta: dict) -> Any:
    """The :class:`~clax.train.Progress` recorded in a checkpoint."""
    from clax.train import Progress
    b = np.asarray(state["init_accuracy"], np.float64)
    return Progress(
        tasks_done=int(meta["tasks_done"]), task_step=int(meta["task_step"]),
        accuracy_matrix=np.asarray(state["accuracy_matrix"], np.float64),
        init_accuracy=b if meta.get("has_init_accuracy", True) else None, train_s=float(meta["train_s"]), steps=int(meta["steps"]),
        compiles_after_task=list(meta.get("compiles_after_task", [])),
        task_key=jnp.asarray(state["task_key"]) if int(meta["task_step"]) else None,
        epoch_metrics=_epoch_metrics(meta),
        val=dict(meta["val"]) if meta.get("val") is not None and int(meta["task_step"]) else None,
        best_cl=state.get("best_cl") if int(meta["task_step"]) else None,  # raw: load_resume makes it a CLState
        task_records=[dict(r) for r in meta.get("task_records", [])])


def _epoch_metrics(meta: dict) -> dict:
    """The current epoch's per-step metrics recorded in ``meta``; an older checkpoint that recorded only
    the losses (``epoch_losses``) gives ``{"loss": ...}`` (the resumed epoch's other means are left out)."""
    if "epoch_metrics" in meta:
        return {k: [float(v) for v in vs] for k, vs in meta["epoch_metrics"].items()}
    losses = meta.get("epoch_losses", [])
    return {"loss": [float(v) for v in losses]} if losses else {}


#: ``train`` settings added after workdirs were first written, with the value an older config means
TRAIN_ADDED = {"val_fraction": 0.0, "val_metric": "loss", "early_stop": 0, "restore_best": False}


def load_resume(workdir: str, config: dict, method, tx,
                say: Callable[[str], None] = _say) -> Optional[tuple[Any, Any, list]]:
    """``(train_state, progress, metrics rows)`` to resume the run of ``config`` in ``workdir``, or None
    when the workdir holds no intact checkpoint.

    A config saved before ``train.lr_scales`` existed (issue 13) reads as ``lr_scales=[]``, except for a
    method with its own scales (PAH), whose state then stored its backbone divided by its scale. One
    saved before the validation settings (issue 15) reads as their defaults (:data:`TRAIN_ADDED`), and one
    saved before the ``data`` section or one of its keys (``data.crop_pad``) reads them as their defaults
    (:data:`clax.data.pipeline.DATA_DEFAULTS`, which change nothing).

    Raises:
      ValueError: the workdir's checkpoint was written with a different config (the message names the
        differing keys and how to start fresh), for a differently shaped state, or before per-partition
        rates by a method that has them.
    """
    found = latest_intact(workdir, say=say)
    if found is None:
        return None
    step, state, saved, meta = found
    if isinstance(saved.get("train"), dict) and "lr_scales" not in saved["train"]:
        if getattr(method, "lr_scales", ()):
            raise ValueError(f"{os.path.normpath(workdir)} holds a {method.name} run saved before per-partition "
                             f"learning rates (its backbone stored divided by its rate scale); rerun with --fresh "
                             f"to move it aside and start over, or use another --workdir")
        saved = {**saved, "train": {**saved["train"], "lr_scales": []}}
    if isinstance(saved.get("train"), dict):  # settings added later: absent means the default
        saved = {**saved, "train": {**TRAIN_ADDED, **saved["train"]}}
    if isinstance(saved.get("data", {}), dict) and "data" in config:  # the data section and its later keys
        from clax.data.pipeline import DATA_DEFAULTS

        saved = {**saved, "data": {**DATA_DEFAULTS, **saved.get("data", {})}}
    diff = config_diff(saved, config)
    if diff:
        raise ValueError(f"{os.path.normpath(workdir)} holds a run with a different config ("
                         f"{'; '.join(diff)}); rerun with --fresh to move it aside and start over, or "
                         f"use another --workdir")
    ts = restore_train_state(state["train_state"], method, tx)
    progress = progress_from(state, meta)
    if getattr(progress, "best_cl", None) is not None:  # the best epoch's method state: same structure as the state's
        progress.best_cl = restore_train_state({**state["train_state"], "cl": state["best_cl"]}, method, tx).cl
    return ts, progress, list(meta.get("rows", []))
