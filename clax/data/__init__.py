"""Task streams and the benchmark registry."""
from __future__ import annotations

from typing import Callable

from clax.data.digits import permuted_digits, split_digits
from clax.data import folder as _folder, tfds as _tfds
from clax.data.stream import SCENARIOS, Benchmark, Task, check_scenario, eval_batches, train_batches

#: name -> factory(seed, view) returning a :class:`Benchmark`. ``view`` is ``"flat"`` or ``"image"``.
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "split-digits": split_digits,
    "permuted-digits": permuted_digits,
    # Real data sets (need data_dir / --data-dir or prepared TFDS data; images are read lazily):
    "split-cifar10": _tfds.split_cifar10,
    "split-cifar100": _tfds.split_cifar100,
    "split-cifar100-20": _tfds.split_cifar100_20,
    "split-tinyimagenet": _folder.split_tinyimagenet,
    "split-tinyimagenet-20": _folder.split_tinyimagenet_20,
    "imagenet-r": _tfds.imagenet_r,
    "cub200": _tfds.cub200,
    "cub200-5": _tfds.cub200_5,
    "5-datasets": _tfds.five_datasets,
    "split-mnist": _tfds.split_mnist,
    "permuted-mnist": _tfds.permuted_mnist,
    "image-folder": _folder.image_folder,
}


def get_benchmark(name: str, seed: int = 0, view: str = "flat", **kwargs) -> Benchmark:
    """Builds the benchmark registered under ``name``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name](seed=seed, view=view, **kwargs)


__all__ = [
    "BENCHMARKS", "SCENARIOS", "Benchmark", "Task", "check_scenario", "eval_batches", "get_benchmark",
    "permuted_digits", "split_digits", "train_batches",
]
