"""Task streams and the benchmark registry."""
from __future__ import annotations

from typing import Callable

from clax.data.digits import permuted_digits, split_digits
from clax.data.stream import SCENARIOS, Benchmark, Task, check_scenario, eval_batches, train_batches

#: name -> factory(seed, view) returning a :class:`Benchmark`. ``view`` is ``"flat"`` or ``"image"``.
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "split-digits": split_digits,
    "permuted-digits": permuted_digits,
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
