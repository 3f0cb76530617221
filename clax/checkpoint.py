"""Orbax checkpoints of the whole trainer state.

A workdir holds ``checkpoints/<step>/`` written by an Orbax ``CheckpointManager``; each item is the
trainer state as a nested dict (:func:`flax.serialization.to_state_dict`), the accuracy matrix so far
and the index of the last finished task, with the run's config as JSON metadata.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


def manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over ``workdir/checkpoints`` keeping the last ``keep`` steps."""
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, train_state: Any, accuracy_matrix: np.ndarray,
         task: int, config: dict) -> None:
    """Saves the trainer state after ``task`` at global ``step``; waits until it is on disk."""
    item = {
        "train_state": serialization.to_state_dict(train_state),
        "accuracy_matrix": np.asarray(accuracy_matrix, np.float64),
        "task": np.asarray(task, np.int32),
    }
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(item),
                                            config=ocp.args.JsonSave(config)))
    mngr.wait_until_finished()


def restore_raw(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """``(state item as nested dict of NumPy arrays, config)`` of ``step`` (default: the latest)."""
    mngr = manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     config=ocp.args.JsonRestore()))
    return out["state"], out["config"]
