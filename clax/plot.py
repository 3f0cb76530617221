"""Figures a person would rather look at than read: the accuracy-matrix heatmap."""
from __future__ import annotations

import numpy as np


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
