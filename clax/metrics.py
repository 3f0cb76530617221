"""Continual-learning metrics from an accuracy matrix, exactly as ../shared/SPEC.md defines them, and
the count of XLA compilations a run makes.

``A[r, c]`` is the test accuracy on task ``c`` after training through task ``r`` (NaN where not
evaluated); ``b[c]`` the accuracy of the freshly initialised model on task ``c``.

FWT is reported only where it measures a transfer: in task-incremental learning (``til``), where task
``c``'s own head or output slice is asked about task ``c`` before and after the earlier tasks. In
class-incremental learning (``cil``) it is ``None`` for every method: a model trained on tasks
``0..c-1`` has been taught never to predict task ``c``'s classes, so ``A[c-1, c]`` is about 0 whatever
was learnt, and ``A[c-1, c] - b[c]`` is minus the untrained model's chance accuracy, not a transfer
(:data:`FWT_SCENARIOS`).
"""
from __future__ import annotations

import threading

import numpy as np

#: the scenarios in which FWT is reported (``None`` in the others; see the module docstring)
FWT_SCENARIOS = ("til",)


def acc(A: np.ndarray) -> float:
    """ACC = mean_c A[T-1, c]."""
    return float(np.mean(A[-1]))


def bwt(A: np.ndarray) -> float:
    """BWT = mean over c < T-1 of (A[T-1, c] - A[c, c]); 0.0 for a single task."""
    T = A.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([A[-1, c] - A[c, c] for c in range(T - 1)]))


def fwt(A: np.ndarray, b: np.ndarray | None) -> float | None:
    """FWT = mean over c >= 1 of (A[c-1, c] - b[c]) (GEM); None where it cannot be evaluated."""
    T = A.shape[0]
    if b is None or T < 2:
        return None
    vals = [A[c - 1, c] - b[c] for c in range(1, T)]
    return None if np.any(np.isnan(vals)) else float(np.mean(vals))


def forgetting(A: np.ndarray) -> float:
    """Forgetting = mean over c < T-1 of (max_{r < T-1} A[r, c] - A[T-1, c])."""
    T = A.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([np.nanmax(A[c:T - 1, c]) - A[-1, c] for c in range(T - 1)]))


def summarize(A: np.ndarray, b: np.ndarray | None = None, scenario: str | None = None) -> dict:
    """All four metrics as a dict (keys ``acc``, ``bwt``, ``fwt``, ``forgetting``); ``fwt`` is ``None``
    for a ``scenario`` outside :data:`FWT_SCENARIOS` (CIL: not a transfer; see the module docstring)."""
    A = np.asarray(A, np.float64)
    f = fwt(A, None if b is None else np.asarray(b, np.float64))
    return {"acc": acc(A), "bwt": bwt(A), "fwt": reported_fwt(f, scenario), "forgetting": forgetting(A)}


def reported_fwt(value: float | None, scenario: str | None) -> float | None:
    """``value`` where FWT means a transfer in ``scenario`` (:data:`FWT_SCENARIOS`, or no scenario
    given), else ``None``."""
    return value if scenario is None or scenario in FWT_SCENARIOS else None


#: the :mod:`jax.monitoring` event of one XLA compilation: JAX records it around every executable it
#: builds, compiled by XLA or read from the persistent compilation cache
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
#: the event of a compilation served by the persistent compilation cache (counted in COMPILE_EVENT too)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class _CompileLog:
    """Process-wide count and seconds of :data:`COMPILE_EVENT` and count of :data:`CACHE_HIT_EVENT`, from
    listeners registered once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count, self.seconds, self.hits, self.installed = 0, 0.0, 0, False

    def on_event(self, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            with self.lock:
                self.hits += 1

    def listener(self, event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT:
            with self.lock:
                self.count += 1
                self.seconds += float(duration)

    def install(self) -> None:
        with self.lock:
            if self.installed:
                return
            from jax import monitoring

            monitoring.register_event_duration_secs_listener(self.listener)
            monitoring.register_event_listener(self.on_event)
            self.installed = True


_LOG = _CompileLog()


class CompileCounter:
    """Counts the XLA compilations (:data:`COMPILE_EVENT`) of this process from its creation on: every
    jitted step, every eager operation compiled for a new shape, every ``jax.jit`` of an init. Threads
    count too (a data pipeline's); a second counter made meanwhile counts the same events. Make one
    before the work, read :attr:`count` and :attr:`seconds` after it.
    """

    def __init__(self):
        _LOG.install()
        self._count, self._seconds, self._hits = _LOG.count, _LOG.seconds, _LOG.hits

    @property
    def count(self) -> int:
        """Compilations since the counter was made."""
        return _LOG.count - self._count

    @property
    def seconds(self) -> float:
        """Seconds spent in them (compiling or reading the persistent cache)."""
        return _LOG.seconds - self._seconds

    @property
    def cache_hits(self) -> int:
        """Of :attr:`count`, those read from JAX's persistent compilation cache rather than compiled."""
        return _LOG.hits - self._hits
