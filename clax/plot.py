"""Figures a person would rather look at than read: the accuracy-matrix heatmap."""
from __future__ import annotations

import os

import numpy as np

from clax.workdir import atomic_open


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Writes matplotlib figure ``fig`` to ``path`` atomically (format from the extension, PNG without
    one; see :func:`clax.workdir.atomic_open`) and closes it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=dpi)
    finally:
        plt.close(fig)


def accuracy_heatmap(A: np.ndarray, path: str, title: str = "") -> None:
    """Writes a heatmap of accuracy matrix ``A`` (rows: after task r; columns: task c) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = A.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * T, 0.8 + 0.6 * T))
    im = ax.imshow(np.ma.masked_invalid(A), vmin=0, vmax=1, cmap="viridis")
    for r in range(T):
        for c in range(T):
            if np.isfinite(A[r, c]):
                ax.text(c, r, f"{A[r, c]:.2f}", ha="center", va="center",
                        color="white" if A[r, c] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_xlabel("evaluated on task c")
    ax.set_ylabel("after training task r")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="test accuracy")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def capacity_plot(runs: dict, path: str, title: str = "") -> None:
    """Writes a figure of capacity per task for several parameter-isolation runs to ``path``.

    ``runs`` maps a label (e.g. a method name) to a dict with per-task lists ``capacity_used``
    (fraction of the weights consolidated after task t) and ``mask_density`` (fraction task t's
    sub-network uses), as in ``results.json``; solid lines show capacity used, dashed lines density.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    for i, (label, r) in enumerate(runs.items()):
        color = f"C{i}"
        used = np.asarray(r["capacity_used"], float)
        tasks = np.arange(1, len(used) + 1)
        ax.plot(tasks, used, "-o", color=color, label=f"{label}: capacity used")
        if r.get("mask_density") is not None:
            ax.plot(tasks, np.asarray(r["mask_density"], float), "--", marker="x", color=color, alpha=0.7,
                    label=f"{label}: task mask density")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("after task")
    ax.set_ylabel("fraction of masked weights")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: hides no line
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
