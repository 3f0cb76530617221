"""Figures a person would rather look at than read: the accuracy-matrix heatmap, ACC after each task for
several runs, capacity per task of parameter-isolation methods and PAH's labelled prototypes; and
``clax plot WORKDIR [WORKDIR ...] [--out DIR]``, which draws them from finished workdirs (:func:`plot_workdirs`).

Each ``*_figure`` function returns a matplotlib figure; :func:`figure_png` renders one to PNG bytes (what
the TensorBoard writer, :mod:`clax.tracking`, stores) and :func:`save_figure` writes one to a file."""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from clax.workdir import atomic_open


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 110) -> bytes:
    """The PNG bytes of matplotlib figure ``fig``, which is closed."""
    import io

    plt = _pyplot()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    finally:
        plt.close(fig)


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Writes matplotlib figure ``fig`` to ``path`` atomically (format from the extension, PNG without
    one; see :func:`clax.workdir.atomic_open`) and closes it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=dpi)
    finally:
        plt.close(fig)


def heatmap_figure(A: np.ndarray, title: str = ""):
    """A heatmap of accuracy matrix ``A`` (rows: after task r; columns: task c; NaN: not evaluated)."""
    plt = _pyplot()
    A = np.asarray([[np.nan if v is None else v for v in row] for row in A], float)
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
    return fig


def accuracy_heatmap(A: np.ndarray, path: str, title: str = "") -> None:
    """Writes a heatmap of accuracy matrix ``A`` (rows: after task r; columns: task c) to ``path``."""
    save_figure(heatmap_figure(A, title), path, dpi=110)


#: line styles that tell many runs apart: colour, marker and dash pattern all change from run to run
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_DASHES = ("-", "--", ":", "-.")


def line_style(i: int) -> dict:
    """Matplotlib keywords of run ``i``'s line: a colour of tab10 (tab20 beyond ten runs), a marker and a
    dash pattern, chosen so that no two of the first 40 runs look alike."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if i < 10 else "tab20")
    return {"color": cmap(i % cmap.N), "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _DASHES[(i // len(_MARKERS)) % len(_DASHES)] if i < 10 else _DASHES[1 + i % 3]}


def acc_after_task(A) -> np.ndarray:
    """ACC after each task: the mean of row ``r`` of accuracy matrix ``A`` over tasks ``0..r``."""
    A = np.asarray([[np.nan if v is None else v for v in row] for row in A], float)
    return np.array([np.nanmean(A[r, : r + 1]) for r in range(A.shape[0])])


def acc_curves_figure(runs: dict, title: str = ""):
    """ACC after each task (:func:`acc_after_task`) of several runs, one line per run (``runs``: label ->
    accuracy matrix), the legend outside the axes."""
    plt = _pyplot()
    import matplotlib.ticker

    n = len(runs)
    ncol = 1 if n <= 30 else 2  # the legend, one line per run, sets the height
    fig, ax = plt.subplots(figsize=(7.6 + 2.2 * (ncol - 1), max(3.8, 0.9 + 0.16 * -(-n // ncol))))
    for i, (label, A) in enumerate(runs.items()):
        acc = acc_after_task(A)
        ax.plot(np.arange(1, len(acc) + 1), acc, label=f"{label} ({acc[-1]:.3f})", markersize=5, alpha=0.9,
                **line_style(i))
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("after task")
    ax.set_ylabel("ACC (mean test accuracy of the tasks seen)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, ncol=ncol,
              title="run (final ACC)", title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def prototypes_figure(protos: np.ndarray, labels=None, title: str = ""):
    """PAH's prototypes ``[T, C, s, s, ch]`` (or its flat table ``[T, C, s * s * ch]``) as a grid, a row
    per task, each image titled with its class (``labels[t][c]``; by default ``class c``); each image is
    scaled to its own min..max."""
    from clax.transforms.prototype import as_images

    plt = _pyplot()
    a = as_images(np.asarray(protos, np.float64))
    if a.ndim == 4:
        a = a[..., None]
    T, C = a.shape[:2]
    fig, axes = plt.subplots(T, C, figsize=(1.1 * C + 0.9, 1.15 * T + 0.5), squeeze=False)
    for t in range(T):
        for c in range(C):
            ax = axes[t, c]
            im = a[t, c].mean(-1) if a.shape[-1] not in (3,) else a[t, c]
            lo, hi = float(im.min()), float(im.max())
            ax.imshow((im - lo) / (hi - lo) if hi > lo else np.zeros_like(im), cmap="gray" if im.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(str(labels[t][c]) if labels is not None else f"class {c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"task {t}", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def capacity_figure(runs: dict, title: str = ""):
    """Capacity per task of several parameter-isolation runs (see :func:`capacity_plot`)."""
    plt = _pyplot()
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.6, 3.6))
    n = len(runs)
    for i, (label, r) in enumerate(runs.items()):
        style = line_style(i)
        used = np.asarray(r["capacity_used"], float)
        # a small sideways shift per run, so that runs with equal values do not hide one another
        tasks = np.arange(1, len(used) + 1) + 0.06 * (i - (n - 1) / 2)
        # density first, large open markers: where it equals capacity (PackNet) its ring shows around the dot
        if r.get("mask_density") is not None:
            ax.plot(tasks, np.asarray(r["mask_density"], float), color=style["color"], marker=style["marker"],
                    linestyle="--", markersize=10, fillstyle="none", alpha=0.8, label=f"{label}: task mask density")
        ax.plot(tasks, used, color=style["color"], marker=style["marker"], linestyle="-", markersize=5,
                label=f"{label}: capacity used")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("after task")
    ax.set_ylabel("fraction of masked weights")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: hides no line
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def capacity_plot(runs: dict, path: str, title: str = "") -> None:
    """Writes a figure of capacity per task for several parameter-isolation runs to ``path``.

    ``runs`` maps a label (e.g. a method name) to a dict with per-task lists ``capacity_used``
    (fraction of the weights consolidated after task t) and ``mask_density`` (fraction task t's
    sub-network uses), as in ``results.json``; solid lines with small filled markers show capacity
    used, dashed lines with large open markers density (a ring around the dot where the two are equal); each run has its own colour and marker and is shifted
    slightly sideways, so equal values stay visible, and the legend sits outside the axes.
    """
    save_figure(capacity_figure(runs, title), path, dpi=110)


def task_labels(bench) -> list[list[str]]:
    """The class of each task's outputs, ``labels[t][c]`` (the benchmark's class name where it has names,
    else ``class <id>``), in the order of the task's TIL targets."""
    names = getattr(bench, "class_names", None)
    return [[names[k] if names else f"class {k}" for k in task.classes] for task in bench.tasks]


def saved_prototypes(workdir: str) -> Optional[tuple[np.ndarray, Optional[list], dict]]:
    """``(prototypes [tasks done, C, s, s, ch], labels or None, config)`` from the newest intact checkpoint
    of ``workdir`` (read-only), or None where it holds no prototype table (a leaf ``protos*`` with a task
    axis whose rows are images, :func:`clax.inspect.prototype_images`). Labels come from rebuilding the
    saved run's benchmark; None where it cannot be rebuilt (e.g. its data are elsewhere)."""
    from clax import checkpoint as ckpt
    from clax.inspect import _leaves, is_prototypes, prototype_images

    found = ckpt.latest_intact(workdir, read_only=True)
    if found is None:
        return None
    _, state, cfg, meta = found
    T, done = int(meta["num_tasks"]), int(meta["tasks_done"])
    for path, a in _leaves(state["train_state"]["cl"].get("shared", {})):
        imgs = prototype_images(a) if is_prototypes(path.rsplit("/", 1)[-1]) else None
        if imgs is not None and a.shape[0] == T:
            labels = None
            try:
                from clax.inspect import readonly_config
                from clax.runner import build

                labels = task_labels(build(readonly_config(cfg))[0])[: max(done, 1)]
            except Exception:  # noqa: BLE001 - the benchmark cannot be rebuilt here: index labels
                pass
            return imgs[: max(done, 1)], labels, cfg
    return None


def _label(workdir: str, taken: set) -> str:
    """A short unique name for a workdir: its base name, with its parent's where that is taken."""
    path = os.path.abspath(workdir)
    label = os.path.basename(path)
    if label in taken:
        label = f"{os.path.basename(os.path.dirname(path))}_{label}"
    while label in taken:
        label += "_"
    taken.add(label)
    return label


_MOVED_ASIDE = re.compile(r"\.old-\d+$")  # workdirs --fresh moved aside


def _finished_runs(workdirs) -> list[tuple[str, dict]]:
    """``[(workdir, results)]``: each workdir's ``results.json``; a folder without one that holds finished
    runs one level down (the main job's ``runs/main-*``) stands for those, except runs that ``--fresh``
    moved aside (``*.old-N``)."""
    import json

    out = []
    for w in workdirs:
        f = os.path.join(w, "results.json")
        subs = sorted(os.path.join(w, d) for d in (os.listdir(w) if os.path.isdir(w) else [])
                      if os.path.isfile(os.path.join(w, d, "results.json")) and not _MOVED_ASIDE.search(d))
        if os.path.isfile(f):
            paths = [w]
        elif subs:
            paths = subs
        elif os.path.isdir(w):
            raise ValueError(f"{w} holds no results.json (the run has not finished) and no finished runs")
        else:
            raise ValueError(f"workdir {w} does not exist")
        for p in paths:
            with open(os.path.join(p, "results.json")) as fh:
                try:
                    out.append((p, json.load(fh)))
                except ValueError:
                    raise ValueError(f"{os.path.join(p, 'results.json')} is not valid JSON") from None
    return out


def plot_workdirs(workdirs, out: str = ".") -> list[str]:
    """Draws the figures of finished workdirs into ``out`` and returns the PNG paths written; reads the
    workdirs only.

    * ``<run>-accuracy_matrix.png``: each run's accuracy matrix;
    * ``acc_per_task.png``: ACC after each task, every run in one figure;
    * ``capacity.png``: capacity used and task mask density per task of the runs that report them
      (parameter isolation: wsn, packnet, ibm);
    * ``<run>-prototypes.png``: the prototypes of runs that have them (pah), each labelled with its class.

    ``<run>`` is the workdir's name (with its parent's where two share one). A folder without
    ``results.json`` that holds finished workdirs (the main job's ``runs/main-*``) stands for them.

    Raises:
      ValueError: a workdir that does not exist, has not finished or whose ``results.json`` is damaged.
    """
    runs = _finished_runs(workdirs)
    os.makedirs(out, exist_ok=True)
    taken: set = set()
    labelled = [(_label(w, taken), w, r) for w, r in runs]
    written = []

    def put(fig, name):
        path = os.path.join(out, name)
        save_figure(fig, path)
        written.append(path)

    for label, _, r in labelled:
        put(heatmap_figure(r["accuracy_matrix"], f"{label}: {r['method']} on {r['benchmark']} "
                           f"({str(r['scenario']).upper()}), ACC {r['acc']:.3f}, BWT {r['bwt']:+.3f}"),
            f"{label}-accuracy_matrix.png")
    put(acc_curves_figure({label: r["accuracy_matrix"] for label, _, r in labelled},
                          "ACC after each task" + (f" ({labelled[0][2]['benchmark']})" if len(
                              {r["benchmark"] for _, _, r in labelled}) == 1 else "")), "acc_per_task.png")
    cap = {label: r for label, _, r in labelled if r.get("capacity_used") is not None}
    if cap:
        put(capacity_figure(cap, "capacity per task (solid: consolidated so far; dashed: the task's mask)"),
            "capacity.png")
    for label, w, r in labelled:
        if "pah" in str(r.get("method", "")).split("+"):  # the method with a prototype table
            found = saved_prototypes(w)
            if found is not None:
                protos, labels, _ = found
                put(prototypes_figure(protos, labels, f"{label}: prototypes {list(protos.shape[1:])} per class"),
                    f"{label}-prototypes.png")
    return written


def cmd_plot(args) -> int:
    """``clax plot``: draws the figures of finished workdirs and prints the PNG paths."""
    for path in plot_workdirs(args.workdirs, args.out):
        print(path)
    return 0


def add_command(sub) -> None:
    """Adds ``plot`` to the ``clax`` command's subparsers."""
    p = sub.add_parser("plot", help="draw figures of finished workdirs (accuracy matrices, ACC per task, "
                       "capacity, prototypes) as PNG files; reads the workdirs only")
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                   help="a finished run's workdir (with results.json), or a folder of them (runs/main-*)")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="folder the PNG files are written to (default: the current directory)")
    p.set_defaults(func=cmd_plot)
