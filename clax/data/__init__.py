"""Task streams and the benchmark registry.

A benchmark is named by its registry name (``split-digits``) or, for a user's own stream, by a reference
``package.module:function`` to a function that returns a :class:`Benchmark` (e.g. one built with
:meth:`Benchmark.from_arrays`): ``clax run --benchmark mybench:make``. The function is called with the
keywords it accepts among ``seed``, ``view`` (``"flat"`` or ``"image"``, what the backbone reads) and
``data_dir``; the module must be importable (on ``PYTHONPATH``, or in the current directory). The
reference is stored in the run's config, so resuming, ``clax inspect`` and ``clax eval`` find it again.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable

from clax.data.digits import permuted_digits, split_digits
from clax.data import folder as _folder, tfds as _tfds
from clax.data.stream import SCENARIOS, Benchmark, Task, check_scenario, eval_batches, train_batches

def is_reference(name) -> bool:
    """Whether ``name`` is a user benchmark reference ``package.module:function`` (it holds a ``:``)."""
    return isinstance(name, str) and ":" in name


def _import(module: str, ref: str):
    """Imports ``module`` (retrying with the current directory on ``sys.path``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not (module == missing or module.startswith(missing + ".")):  # the module imports a missing one
            raise ValueError(f"benchmark {ref!r}: importing {module} failed: {e}") from None
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
            return _import(module, ref)
        raise ValueError(f"benchmark {ref!r}: no module named {missing!r} (put it on PYTHONPATH or in the "
                         f"current directory)") from None


class UserBenchmark:
    """The factory of a user benchmark ``package.module:function`` (see the module docstring).

    Calling it calls the function with the keywords it accepts (``seed``, ``view``, ``data_dir``, ...) and
    checks that it returned a :class:`Benchmark`; the last result is kept, so that checking a reference
    before a run and building the run load the data once.

    Raises (at construction):
      ValueError: a malformed reference, a module that cannot be imported, no such function, naming it.
    """

    _last: dict = {}

    def __init__(self, ref: str):
        module, _, attr = ref.partition(":")
        if not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
            raise ValueError(f"benchmark {ref!r} must be a registered name or package.module:function")
        obj = _import(module, ref)
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"benchmark {ref!r}: module {module} has no function {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise ValueError(f"benchmark {ref!r}: {module}.{attr} is a {type(obj).__name__}, not a function")
        self.ref, self.fn = ref, obj
        self.__doc__ = getattr(obj, "__doc__", None)

    def __call__(self, **kwargs) -> Benchmark:
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            params = {}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        key = (self.ref, repr(sorted(kwargs.items())))
        if key in UserBenchmark._last:
            return UserBenchmark._last[key]
        try:
            bench = self.fn(**kwargs)
        except TypeError as e:
            raise ValueError(f"benchmark {self.ref!r}: calling it with {sorted(kwargs) or 'no arguments'} "
                             f"failed: {e}") from None
        if not isinstance(bench, Benchmark):
            raise ValueError(f"benchmark {self.ref!r} returned a {type(bench).__name__}, not a "
                             f"clax.data.Benchmark (build one with Benchmark.from_arrays)")
        UserBenchmark._last.clear()
        UserBenchmark._last[key] = bench
        return bench


class _Registry(dict):
    """The registry: a user reference that is not a key resolves to its :class:`UserBenchmark`."""

    def __missing__(self, name):
        if is_reference(name):
            return UserBenchmark(name)
        raise KeyError(name)


#: name -> factory(seed, view) returning a :class:`Benchmark`. ``view`` is ``"flat"`` or ``"image"``. A user
#: reference ``package.module:function`` is no key but looks up as its :class:`UserBenchmark`.
BENCHMARKS: dict[str, Callable[..., Benchmark]] = _Registry({
    "split-digits": split_digits,
    "permuted-digits": permuted_digits,
    # Real data sets (need data_dir / --data-dir or prepared TFDS data; images are read lazily):
    "split-cifar10": _tfds.split_cifar10,
    "split-cifar100": _tfds.split_cifar100,
    "split-cifar100-20": _tfds.split_cifar100_20,
    "split-tinyimagenet": _folder.split_tinyimagenet,
    "split-tinyimagenet-20": _folder.split_tinyimagenet_20,
    "split-tinyimagenet32": _folder.split_tinyimagenet32,  # 32x32 re-encode: label figures "Tiny-ImageNet 32x32"
    "split-tinyimagenet32-20": _folder.split_tinyimagenet32_20,
    "cifar10-cifar100": _tfds.cifar10_cifar100,  # hembed's 11-task stream: CIFAR-10, then 10 CIFAR-100 splits
    "imagenet-r": _tfds.imagenet_r,
    "cub200": _tfds.cub200,
    "cub200-5": _tfds.cub200_5,
    "5-datasets": _tfds.five_datasets,
    "split-mnist": _tfds.split_mnist,
    "permuted-mnist": _tfds.permuted_mnist,
    "image-folder": _folder.image_folder,
})


def get_benchmark(name: str, seed: int = 0, view: str = "flat", **kwargs) -> Benchmark:
    """Builds the benchmark registered under ``name``, or a user's ``package.module:function``."""
    if name not in BENCHMARKS and not is_reference(name):
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))} or "
                         f"package.module:function")
    return BENCHMARKS[name](seed=seed, view=view, **kwargs)


__all__ = [
    "BENCHMARKS", "SCENARIOS", "Benchmark", "Task", "UserBenchmark", "check_scenario", "eval_batches", "get_benchmark",
    "is_reference",
    "permuted_digits", "split_digits", "train_batches",
]
