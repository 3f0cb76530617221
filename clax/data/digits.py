"""Offline benchmarks on scikit-learn's 1,797 handwritten 8x8 digits (shipped inside scikit-learn).

* ``split-digits``: 5 tasks of 2 classes; the class order is a permutation drawn from the seed.
* ``permuted-digits``: 10 tasks over all 10 classes; task 0 sees the original pixels, task t > 0 a
  fixed pixel permutation drawn from the seed.

Both use a stratified 80/20 train/test split (drawn from the seed). The ``flat`` view gives
``[N, 64]`` vectors in [0, 1]; the ``image`` view gives ``[N, 32, 32, 3]`` (each pixel repeated 4x4,
grey repeated over RGB) so that CNN and ViT backbones run on the same data.
"""
from __future__ import annotations

import functools

import numpy as np

from clax.data.stream import Benchmark, Task

VIEWS = ("flat", "image")


def _load(seed: int):
    """``(x_train, x_test, y_train, y_test)`` of the split drawn from ``seed``: fresh copies of the
    process's first load (scikit-learn parses its file and splits in about 0.1 s, once per run of the
    main job's workers otherwise)."""
    return tuple(a.copy() for a in _split(seed))


@functools.lru_cache(maxsize=8)
def _split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def _view(x: np.ndarray, view: str) -> np.ndarray:
    if view == "flat":
        return x
    if view == "image":
        img = x.reshape(-1, 8, 8)
        img = np.repeat(np.repeat(img, 4, axis=1), 4, axis=2)
        return np.repeat(img[..., None], 3, axis=-1).astype(np.float32)
    raise ValueError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")


def split_digits(seed: int = 0, view: str = "flat", num_tasks: int = 5) -> Benchmark:
    """Split-Digits: ``num_tasks`` tasks of ``10 // num_tasks`` classes, class order from the seed."""
    if num_tasks < 1 or 10 % num_tasks:
        raise ValueError(f"num_tasks={num_tasks} does not divide the 10 digit classes")
    x_tr, x_te, y_tr, y_te = _load(seed)
    order = np.random.default_rng(seed).permutation(10).reshape(num_tasks, -1).tolist()
    return Benchmark.from_arrays(
        "split-digits", _view(x_tr, view), y_tr, _view(x_te, view), y_te, order,
        class_names=[str(i) for i in range(10)],
    )


def permuted_digits(seed: int = 0, view: str = "flat", num_tasks: int = 10) -> Benchmark:
    """Permuted-Digits: every task has all 10 classes; task t > 0 permutes the 64 pixels."""
    x_tr, x_te, y_tr, y_te = _load(seed)
    rng = np.random.default_rng(seed + 1)
    tasks = []
    for t in range(num_tasks):
        perm = np.arange(64) if t == 0 else rng.permutation(64)
        tasks.append(Task(t, tuple(range(10)), _view(x_tr[:, perm], view), y_tr,
                          _view(x_te[:, perm], view), y_te))
    shape = tuple(tasks[0].x_train.shape[1:])
    return Benchmark("permuted-digits", tuple(tasks), 10, shape, tuple(str(i) for i in range(10)))
