"""Continual-learning metrics from an accuracy matrix, exactly as ../shared/SPEC.md defines them.

``A[r, c]`` is the test accuracy on task ``c`` after training through task ``r`` (NaN where not
evaluated); ``b[c]`` the accuracy of the freshly initialised model on task ``c``.
"""
from __future__ import annotations

import numpy as np


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


def summarize(A: np.ndarray, b: np.ndarray | None = None) -> dict:
    """All four metrics as a dict (keys ``acc``, ``bwt``, ``fwt``, ``forgetting``)."""
    A = np.asarray(A, np.float64)
    return {"acc": acc(A), "bwt": bwt(A), "fwt": fwt(A, None if b is None else np.asarray(b, np.float64)),
            "forgetting": forgetting(A)}
