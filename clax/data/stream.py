"""Task streams: a benchmark is a sequence of tasks, each with its data and its classes.

Labels are stored as *global* class ids. A scenario decides what a model is asked to output:

* ``til`` (task-incremental): the task id is given; the target is the label's index in its task's
  class list (``0 .. C_t - 1``).
* ``cil`` (class-incremental): no task id; the target is the global label (``0 .. num_classes - 1``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np

SCENARIOS = ("til", "cil")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a stream.

    Attributes:
      task_id: position in the stream, 0-based.
      classes: the global class ids of this task, in the order that defines TIL targets.
      x_train, y_train, x_test, y_test: images ``[N, *input_shape]`` float32 and global labels ``[N]``.
    """

    task_id: int
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim < 2:
                raise ValueError(f"task {self.task_id}: x_{split} has shape {x.shape}; expected [N, ...]")
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"task {self.task_id}: y_{split} has shape {y.shape}; expected ({x.shape[0]},)"
                )
            bad = np.setdiff1d(np.unique(y), np.asarray(self.classes))
            if bad.size:
                raise ValueError(
                    f"task {self.task_id}: label {int(bad[0])} in y_{split} is not one of the task's "
                    f"classes {list(self.classes)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"task {self.task_id}: train images {self.x_train.shape[1:]} and test images "
                f"{self.x_test.shape[1:]} differ in shape"
            )

    def targets(self, y: np.ndarray, scenario: str) -> np.ndarray:
        """Maps global labels to the scenario's targets (local index in TIL, global id in CIL)."""
        if scenario == "cil":
            return y.astype(np.int32)
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([lookup[int(v)] for v in y], np.int32)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A named sequence of tasks with a common input shape.

    Attributes:
      name: registry name, e.g. ``"split-digits"``.
      tasks: the tasks in stream order.
      num_classes: size of the global label space (CIL output size).
      input_shape: the shape of one input, e.g. ``(64,)`` or ``(32, 32, 3)``.
      class_names: optional human-readable names, indexed by global class id.
    """

    name: str
    tasks: tuple[Task, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if not self.tasks:
            raise ValueError(f"benchmark {self.name!r} has no tasks")
        for t in self.tasks:
            if tuple(t.x_train.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"benchmark {self.name!r}, task {t.task_id}: images have shape "
                    f"{tuple(t.x_train.shape[1:])}; expected {tuple(self.input_shape)}"
                )
            if max(t.classes) >= self.num_classes or min(t.classes) < 0:
                raise ValueError(
                    f"benchmark {self.name!r}, task {t.task_id}: class ids {list(t.classes)} fall "
                    f"outside 0..{self.num_classes - 1}"
                )

    @property
    def num_tasks(self) -> int:
        """The number of tasks in the stream."""
        return len(self.tasks)

    @property
    def max_classes_per_task(self) -> int:
        """The most classes any task has."""
        return max(len(t.classes) for t in self.tasks)

    def num_outputs(self, scenario: str) -> int:
        """Width of the output layer: classes per task in TIL, all classes in CIL."""
        check_scenario(scenario)
        return self.max_classes_per_task if scenario == "til" else self.num_classes

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        class_order: Sequence[Sequence[int]],
        class_names: Sequence[str] | None = None,
    ) -> "Benchmark":
        """Splits a labelled data set into tasks by class: task t holds ``class_order[t]``.

        Raises:
          ValueError: naming the problem: a task without classes or without training or test samples,
            a label that belongs to no task, a repeated class, mismatched shapes.
        """
        x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
        y_train, y_test = np.asarray(y_train), np.asarray(y_test)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(f"train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ")
        for split, y in (("y_train", y_train), ("y_test", y_test)):
            if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
                raise ValueError(f"{split} must be a 1-d array of integer labels, got shape {y.shape}, "
                                 f"dtype {y.dtype}")
        class_order = [list(cs) for cs in class_order]
        if not class_order:
            raise ValueError(f"benchmark {name!r}: class_order is empty (no tasks)")
        every = [c for cs in class_order for c in cs]
        if len(set(every)) != len(every):
            raise ValueError(f"class_order {class_order} repeats a class")
        for t, cs in enumerate(class_order):
            if not cs:
                raise ValueError(f"benchmark {name!r}: task {t} of class_order has no classes")
        for split, y in (("y_train", y_train), ("y_test", y_test)):
            stray = np.setdiff1d(np.unique(y), np.asarray(every))
            if stray.size:
                raise ValueError(f"benchmark {name!r}: label {int(stray[0])} in {split} belongs to no task "
                                 f"of class_order ({stray.size} such label{'s' if stray.size > 1 else ''})")
        for t, cs in enumerate(class_order):
            for split, y in (("training", y_train), ("test", y_test)):
                if not np.isin(y, cs).any():
                    raise ValueError(f"benchmark {name!r}: task {t} (classes {cs}) has no {split} samples")
        num_classes = int(max(int(y_train.max()), int(y_test.max()), max(every)) + 1)
        tasks = []
        for t, cs in enumerate(class_order):
            tr, te = np.isin(y_train, cs), np.isin(y_test, cs)
            tasks.append(Task(t, tuple(int(c) for c in cs), x_train[tr], y_train[tr], x_test[te], y_test[te]))
        return cls(name, tuple(tasks), num_classes, tuple(x_train.shape[1:]),
                   tuple(class_names) if class_names is not None else None)


def check_scenario(scenario: str) -> None:
    """Raises ValueError naming ``scenario`` and the valid ones (:data:`SCENARIOS`) when it is not one."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")


def train_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator, tid: np.ndarray | None = None
) -> Iterator[dict]:
    """Shuffled full batches for one epoch.

    The last batch is filled up by wrapping around the permutation, so every batch has the same shape
    (no recompilation) and holds only real samples (BatchNorm statistics stay unbiased).
    """
    n = x.shape[0]
    perm = rng.permutation(n)
    steps = max(1, -(-n // batch_size))
    idx = np.resize(perm, steps * batch_size).reshape(steps, batch_size)
    for b in idx:
        batch = {"x": x[b], "y": y[b]}
        if tid is not None:
            batch["tid"] = tid[b]
        yield batch


def map_rows(fn: Callable, x, *rows, batch_size: int = 256) -> np.ndarray:
    """``fn(xb, *rows_b)`` of a per-sample function over ``x`` (and the arrays ``rows`` beside it, one
    entry per row of ``x``) in ordered batches of ``batch_size`` rows, the last one padded as
    :func:`eval_batches` pads (with its own rows), the outputs concatenated with the padding dropped.

    Every batch has the same shape, so a jitted ``fn`` compiles once for every test set, whatever its
    length (the test reports of Soft-TF's task-id inference and mask precision compiled once per task
    before). ``x`` may be a lazy image source (rows are read by index), or a list of arrays or sources
    taken one after the other (and each of ``rows`` a list of as many arrays): every task's test set
    in one pass, so that only the last batch of all is padded, not each task's.
    """
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    rows = [np.concatenate([np.asarray(p) for p in r]) if isinstance(r, (list, tuple)) else np.asarray(r)
            for r in rows]
    offsets = np.cumsum([0] + [len(p) for p in parts])
    n = int(offsets[-1])

    def take(idx):
        if len(parts) == 1:
            return np.asarray(parts[0][idx])
        part = np.searchsorted(offsets, idx, side="right") - 1
        got = {int(q): np.asarray(parts[q][idx[part == q] - offsets[q]]) for q in np.unique(part)}
        first = next(iter(got.values()))
        out = np.empty((len(idx),) + first.shape[1:], first.dtype)
        for q, v in got.items():
            out[part == q] = v
        return out

    out = []
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        k = len(idx)
        if k < batch_size:
            idx = np.concatenate([idx, idx[np.arange(batch_size - k) % k]])
        out.append(np.asarray(fn(take(idx), *(r[idx] for r in rows)))[:k])
    return np.concatenate(out) if out else np.zeros((0,))


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[dict]:
    """Ordered batches padded to ``batch_size``; ``w`` is 1 for real samples and 0 for padding.

    The padding repeats the batch's own samples (not zeros), so that a prediction that depends on the
    whole batch (BatchNorm with test-batch statistics, ``bn=batch``) sees only real inputs."""
    n = x.shape[0]
    for s in range(0, n, batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        pad = batch_size - xb.shape[0]
        w = np.ones(batch_size, np.float32)
        if pad:
            fill = np.arange(pad) % xb.shape[0]
            xb = np.concatenate([xb, xb[fill]])
            yb = np.concatenate([yb, yb[fill]])
            w[batch_size - pad:] = 0
        yield {"x": xb, "y": yb, "w": w}
