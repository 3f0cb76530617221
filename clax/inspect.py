"""What a workdir stored: ``clax inspect WORKDIR [--task N] [--json]`` and ``clax eval WORKDIR``.

``inspect`` reads the newest intact checkpoint without building the method's training step: the tasks
done, every leaf of every partition (shape, dtype, parameter count, bytes), the bytes each task adds,
and, found by the leaf's name so that any method gets them by naming its leaves accordingly:

* mask densities (:func:`is_mask`: a path containing ``mask``, a ``uint8`` leaf named ``packed`` or
  a boolean array of rank >= 2) as the fraction of nonzero entries, of set bits for ``uint8``
  (bit-packed) masks; leaves with a leading task axis get one density per task;
* a task-distance matrix (Euclidean, between flattened rows) for every task embedding
  (:func:`is_task_embedding`: leaf named ``emb``, ``*_emb`` or ``task_emb*``) and every prototype leaf
  (:func:`is_prototypes`: named ``proto*``; PAH's task embedding is the flatten of its prototypes)
  that has a leading task axis, over the tasks done;
* with ``--png-dir DIR``, a PNG grid of every prototype leaf of rank >= 3 (one small image per class,
  a row per task) written to ``DIR``; without it nothing is drawn.

``eval`` rebuilds the method from the saved config, restores its state and re-evaluates every finished
task on the benchmark's test sets, comparing with the saved accuracy matrix; it says which tasks it
compared (none for a checkpoint inside a task: the matrix holds accuracies after finished tasks only).

Both are read-only: they never train, never pretrain and write nothing (``inspect`` draws prototype
PNGs only into a folder the user names with ``--png-dir``). The method is rebuilt
with :func:`readonly_config`: a frozen-backbone method takes its frozen weights from the checkpoint,
which holds them, so the saved config's pretraining settings (a cache directory anywhere) are not used.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

PARTITIONS = ("frozen", "shared", "per_task", "state", "extra")


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
    from flax.traverse_util import flatten_dict

    return [(p, np.asarray(v)) for p, v in sorted(flatten_dict(tree, sep="/").items())] if tree else []


def is_mask(path: str, a: np.ndarray) -> bool:
    """A mask by name: a path containing ``mask``, a ``uint8`` leaf named ``packed`` (bit-packed masks,
    as WSN stores them), or a boolean array of rank >= 2 (e.g. the ``consolidation`` union)."""
    leaf = path.rsplit("/", 1)[-1].lower()
    return "mask" in path.lower() or (leaf == "packed" and a.dtype == np.uint8) or (
        a.dtype == bool and a.ndim >= 2)


def is_task_embedding(leaf: str) -> bool:
    """A task embedding by its leaf name: ``emb``, ``*_emb``, ``*_embs`` or containing ``task_emb``
    (``hnet``/``hembed``: ``per_task/emb``, ``extra/h_embedding/h_emb``); chunk embeddings are not."""
    leaf = leaf.lower()
    return "chunk" not in leaf and (leaf in ("emb", "embs") or leaf.endswith(("_emb", "_embs"))
                                    or "task_emb" in leaf)


def is_prototypes(leaf: str) -> bool:
    """Prototypes by their leaf name: starting with ``proto`` (PAH: ``shared/protos``)."""
    return leaf.lower().startswith("proto")


def mask_density(a: np.ndarray) -> float:
    """Fraction of nonzero entries of a mask; for ``uint8`` (bit-packed) masks, of set bits."""
    if a.size == 0:
        return float("nan")
    if a.dtype == np.uint8:
        return float(np.unpackbits(a.ravel()).mean())
    return float(np.count_nonzero(a) / a.size)


def distance_matrix(rows: np.ndarray) -> np.ndarray:
    """``[n, n]`` Euclidean distances between the flattened rows of ``rows`` ``[n, ...]``."""
    f = np.asarray(rows, np.float64).reshape(rows.shape[0], -1)
    return np.sqrt(np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0.0))


def prototype_images(a: np.ndarray) -> np.ndarray | None:
    """A prototype leaf as images ``[T, C, s, s, ch]``: PAH's flat table ``[T, C, s * s * ch]`` reshaped
    (:func:`clax.transforms.prototype.as_images`), a leaf of rank >= 4 as it is; None for a leaf that
    holds no images (rank < 3, or rows that are no square image)."""
    from clax.transforms.prototype import as_images

    if a.ndim < 3:
        return None
    try:
        return as_images(a)
    except ValueError:
        return None


def save_image_grid(a: np.ndarray, path: str, title: str = "") -> None:
    """Writes the small images of ``a`` to a PNG grid.

    ``a`` is ``[..., H, W]`` or ``[..., H, W, C]`` with C in {1, 3}; with two leading axes (task, class)
    a row per task, otherwise a square-ish grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clax.plot import save_figure

    a = np.asarray(a, np.float64)
    img_nd = 3 if a.ndim >= 3 and a.shape[-1] in (1, 3) else 2
    lead = a.shape[: a.ndim - img_nd]
    imgs = a.reshape((-1,) + a.shape[a.ndim - img_nd:])
    if img_nd == 3 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    n = imgs.shape[0]
    rows, cols = (lead[0], int(np.prod(lead[1:]))) if len(lead) >= 2 else (
        math.ceil(n / math.ceil(math.sqrt(n))), math.ceil(math.sqrt(n)))
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 0.4, 0.9 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            im = imgs[i]
            lo, hi = float(im.min()), float(im.max())
            ax.imshow((im - lo) / (hi - lo) if hi > lo else np.zeros_like(im), cmap="gray" if im.ndim == 2 else None)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path, dpi=100)


def readonly_config(cfg: dict) -> dict:
    """``cfg`` for rebuilding a saved run's method without training, pretraining or writing anything:
    a frozen-backbone method (one with a ``pretrained`` setting, CLR and Soft-TF) gets
    ``pretrained="none"`` and no pretraining cache (``pretrain_dir=""``). Its state, the frozen weights
    included, comes from the checkpoint; the rebuilt method only has to give the state's structure, which
    does not depend on where the weights came from. (A checkpoint given as ``backbone.pretrained`` is
    still read: it can change the backbone's shapes.)"""
    from clax.methods import METHODS
    from clax.methods.frozen import PRETRAIN_DEFAULTS

    name = cfg.get("method")
    for part in (name.split("+") if isinstance(name, str) else []):
        spec = METHODS.get(part)
        if spec is None or not set(PRETRAIN_DEFAULTS) <= set(spec.defaults):
            continue
        sec = dict(cfg.get(part) or {})
        sec.update(pretrained="none", pretrain_dir="")
        cfg = {**cfg, part: sec}
    return cfg


def _task_bytes(cfg: dict, cl: dict, T: int, row_bytes: int) -> tuple[list[int], str]:
    """Bytes stored per task: the per-task row plus the method's ``task_bytes`` where it has one."""
    try:
        import jax
        import jax.numpy as jnp

        from clax.partition import CLState
        from clax.runner import build

        method = build(readonly_config(cfg))[2]
        if method.task_bytes is None:
            return [row_bytes] * T, "per-task row"
        state = CLState(**{k: jax.tree.map(jnp.asarray, cl[k]) for k in PARTITIONS})
        return [row_bytes + int(method.task_bytes(state, t)) for t in range(T)], "per-task row + method.task_bytes"
    except Exception as e:  # noqa: BLE001 - the method cannot be rebuilt here (e.g. data absent)
        return [row_bytes] * T, f"per-task row only (method not rebuilt: {type(e).__name__})"


def describe(workdir: str, task: Optional[int] = None, png_dir: Optional[str] = None) -> dict:
    """What the newest intact checkpoint of ``workdir`` holds, as a JSON-ready dict (see the module
    docstring); with ``task``, what task ``task``'s own checkpoint (written at the end of that task)
    holds where the workdir has it (else the newest), with per-task leaves, densities and distances
    restricted to that task.

    Raises:
      FileNotFoundError: the workdir has no readable checkpoint.
      ValueError: ``task`` is out of range.
    """
    from clax import checkpoint as ckpt

    found = (task is not None and ckpt.task_checkpoint(workdir, task)) or ckpt.latest_intact(workdir, read_only=True)
    if found is None:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt.checkpoint_dir(workdir)}")
    step, state, cfg, meta = found
    cl = state["train_state"]["cl"]
    T = int(meta["num_tasks"])
    if task is not None and not 0 <= task < T:
        raise ValueError(f"--task must be in 0..{T - 1}, got {task}")
    done = int(meta["tasks_done"])
    A = np.asarray(state["accuracy_matrix"], np.float64)
    out: dict = {
        "workdir": os.path.abspath(workdir), "step": int(step), "clax_version": meta.get("clax_version"),
        "method": cfg.get("method"), "benchmark": cfg.get("benchmark"), "scenario": cfg.get("scenario"),
        "num_tasks": T, "tasks_done": done, "task_step": int(meta["task_step"]),
        "accuracy_matrix": [[None if not np.isfinite(v) else float(v) for v in row] for row in A],
        "partitions": {}, "masks": [], "task_distances": [], "prototypes": [],
    }
    for name in PARTITIONS:
        leaves = []
        for path, a in _leaves(cl.get(name, {})):
            entry = {"path": path, "shape": list(a.shape), "dtype": str(a.dtype), "count": int(a.size),
                     "bytes": int(a.nbytes)}
            if name == "per_task" and task is not None:
                r = a[task]
                entry["task_row"] = {"shape": list(r.shape), "count": int(r.size), "bytes": int(r.nbytes)}
            leaves.append(entry)
        out["partitions"][name] = {"count": sum(e["count"] for e in leaves),
                                   "bytes": sum(e["bytes"] for e in leaves), "leaves": leaves}
    row_bytes = out["partitions"]["per_task"]["bytes"] // max(T, 1)
    out["bytes_per_task"], out["bytes_per_task_from"] = _task_bytes(cfg, cl, T, row_bytes)
    if task is not None:
        out["task"] = task
        out["task_bytes"] = out["bytes_per_task"][task]
    seen = done if done else T
    tasks = [task] if task is not None else list(range(T))
    for name in PARTITIONS:
        for path, a in _leaves(cl.get(name, {})):
            full, leaf = f"{name}/{path}", path.rsplit("/", 1)[-1].lower()
            per_task = a.ndim >= 2 and a.shape[0] == T
            if is_mask(full, a):
                m = {"path": full, "shape": list(a.shape), "packed": a.dtype == np.uint8}
                if per_task:
                    m["per_task"] = {str(t): mask_density(a[t]) for t in tasks}
                else:
                    m["density"] = mask_density(a)
                out["masks"].append(m)
            if (is_task_embedding(leaf) or is_prototypes(leaf)) and per_task:
                D = distance_matrix(a[:seen])
                d = {"path": full, "tasks": list(range(seen)),
                     "distance": [[float(v) for v in row] for row in D]}
                if task is not None and task < seen:
                    d["from_task"] = d["distance"][task]
                out["task_distances"].append(d)
            imgs = prototype_images(a) if is_prototypes(leaf) else None
            if imgs is not None:
                png = None
                if png_dir:  # drawn only where the user asks: a read-only command writes nothing by default
                    os.makedirs(png_dir, exist_ok=True)
                    png = os.path.abspath(os.path.join(png_dir, full.replace("/", "_") + ".png"))
                    save_image_grid(imgs[task] if task is not None and per_task else imgs, png,
                                    f"{full} {list(a.shape)}")
                out["prototypes"].append({"path": full, "shape": list(a.shape), "png": png})
    return out


def format_description(d: dict) -> str:
    """``describe``'s dict as text."""
    T, done = d["num_tasks"], d["tasks_done"]
    where = f"{done} of {T} tasks done" + (f", task {done} at step {d['task_step']}" if d["task_step"] else "")
    lines = [f"{d['workdir']}: {d['method']} on {d['benchmark']} ({str(d['scenario']).upper()}), "
             f"checkpoint step {d['step']}: {where}", "",
             f"{'partition/leaf':<44} {'shape':<18} {'dtype':<8} {'params':>10} {'bytes':>11}"]
    for name, p in d["partitions"].items():
        lines.append(f"{name:<44} {'':<18} {'':<8} {p['count']:>10d} {p['bytes']:>11d}")
        for e in p["leaves"]:
            lines.append(f"  {e['path']:<42} {str(tuple(e['shape'])):<18} {e['dtype']:<8} {e['count']:>10d} "
                         f"{e['bytes']:>11d}")
            if "task_row" in e:
                r = e["task_row"]
                lines.append(f"    task {d['task']} row{'':<33} {str(tuple(r['shape'])):<18} {'':<8} "
                             f"{r['count']:>10d} {r['bytes']:>11d}")
    total = sum(p["count"] for p in d["partitions"].values())
    lines += [f"{'total':<44} {'':<18} {'':<8} {total:>10d} "
              f"{sum(p['bytes'] for p in d['partitions'].values()):>11d}", "",
              f"bytes per task ({d['bytes_per_task_from']}): {d['bytes_per_task']}"]
    for m in d["masks"]:
        dens = m.get("per_task") or {"all": m.get("density")}
        lines.append(f"mask density {m['path']}: " + ", ".join(f"{k}: {v:.3f}" for k, v in dens.items()))
    for t in d["task_distances"]:
        lines.append(f"task distances ({t['path']}):")
        lines += ["  " + " ".join(f"{v:8.3f}" for v in row) for row in t["distance"]]
    for p in d["prototypes"]:
        lines.append(f"prototypes {p['path']} {tuple(p['shape'])}: {p['png'] or '(--png-dir DIR draws them)'}")
    return "\n".join(lines)


def evaluate_workdir(workdir: str) -> dict:
    """Re-evaluates the newest intact checkpoint of ``workdir`` on its benchmark's test sets, without
    training, pretraining or writing anything (see :func:`readonly_config`).

    Returns:
      ``{"step", "num_tasks", "tasks_done", "task_step", "accuracy": [per evaluated task], "saved": [the
      saved accuracy matrix's row for that state, None where absent], "compared": [the tasks whose
      accuracy was compared with a saved one], "matches": bool}``. A checkpoint inside a task compares
      nothing (the matrix holds the accuracies after finished tasks only); ``matches`` is then True.
    """
    from clax.config import train_config
    from clax.runner import build
    from clax.models import step_options
    from clax.train import Steps, evaluate, make_optimizer

    from clax import checkpoint as ckpt

    found = ckpt.latest_intact(workdir, read_only=True)
    if found is None:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt.checkpoint_dir(workdir)}")
    step, state, cfg, meta = found
    bench, ctx, method = build(readonly_config(cfg))
    tcfg = train_config(cfg)
    tx = make_optimizer(tcfg, method)
    ts = ckpt.restore_train_state(state["train_state"], method, tx)
    done, T = int(meta["tasks_done"]), bench.num_tasks
    n = min(T, done + (1 if int(meta["task_step"]) else 0))
    steps = Steps(method, tx, ctx.scenario, step_options(ctx.backbone))
    acc = [evaluate(steps, ts.cl, bench, ctx.scenario, c, tcfg.eval_batch_size) for c in range(n)]
    A = np.asarray(state["accuracy_matrix"], np.float64)
    saved = [None] * n
    if done and not int(meta["task_step"]):
        saved = [None if not np.isfinite(v) else float(v) for v in A[done - 1, :n]]
    compared = [c for c, s in enumerate(saved) if s is not None]
    matches = all(saved[c] == acc[c] for c in compared)
    return {"workdir": os.path.abspath(workdir), "step": int(step), "method": cfg["method"],
            "benchmark": cfg["benchmark"], "scenario": cfg["scenario"], "num_tasks": T, "tasks_done": done,
            "task_step": int(meta["task_step"]), "accuracy": acc, "saved": saved, "compared": compared,
            "matches": matches}


def cmd_inspect(args) -> int:
    """``clax inspect``."""
    d = describe(args.workdir, args.task, args.png_dir)
    print(json.dumps(d, indent=1) if args.json else format_description(d))
    return 0


def cmd_eval(args) -> int:
    """``clax eval``: prints the re-evaluated accuracies; exit 1 if they differ from the saved ones."""
    r = evaluate_workdir(args.workdir)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        inside = f", inside task {r['tasks_done']} (step {r['task_step']} of the task)" if r["task_step"] else ""
        print(f"{r['method']} on {r['benchmark']} ({r['scenario'].upper()}), checkpoint step {r['step']}, "
              f"{r['tasks_done']} of {r['num_tasks']} tasks done{inside}")
        for c, (a, s) in enumerate(zip(r["accuracy"], r["saved"])):
            print(f"  task {c}: {a:.4f}" + ("" if s is None else f"  (saved {s:.4f})"))
        print(_compared_line(r))
    return 0 if r["matches"] else 1


def _compared_line(r: dict) -> str:
    """The last line of ``clax eval``: which tasks were compared with the saved accuracy matrix."""
    if not r["compared"]:
        return (f"compared nothing: the checkpoint is inside task {r['tasks_done']}, and the saved accuracy "
                f"matrix holds the accuracies after finished tasks only")
    tasks = ", ".join(map(str, r["compared"]))
    which = f"tasks {tasks}" if len(r["compared"]) > 1 else f"task {tasks}"
    row = f"its row after task {r['tasks_done'] - 1}" + (
        "" if r["tasks_done"] >= r["num_tasks"] else f", of {r['num_tasks']}: the run is unfinished")
    verdict = "match" if r["matches"] else "DIFFER"
    return f"compared {which} with the saved accuracy matrix ({row}): {verdict}"


def add_commands(sub) -> None:
    """Adds ``inspect`` and ``eval`` to the ``clax`` command's subparsers."""
    i = sub.add_parser("inspect", help="what a workdir's checkpoint holds, per partition and per task",
                       description="What a workdir's newest intact checkpoint holds: every leaf of every "
                                   "partition, the bytes each task adds, mask densities, task distances. "
                                   "Read-only.")
    i.add_argument("workdir", help="the workdir of a run (clax run --workdir)")
    i.add_argument("--task", type=int, metavar="N",
                   help="read task N's checkpoint (written at the end of task N; the newest where there is "
                        "none) and restrict per-task rows, densities and distances to it; N in 0..tasks-1. "
                        "Default: the newest checkpoint, every task")
    i.add_argument("--json", action="store_true", help="print JSON. Default: off (text)")
    i.add_argument("--png-dir", metavar="DIR",
                   help="draw prototype PNGs into this folder. Default: none drawn (inspect writes nothing)")
    i.set_defaults(func=cmd_inspect)
    e = sub.add_parser("eval", help="re-evaluate a workdir's saved state on its benchmark",
                       description="Rebuild the run from its saved config, restore the newest intact "
                                   "checkpoint and re-evaluate it on the benchmark's test sets, comparing "
                                   "with the saved accuracy matrix (exit 1 if they differ). Read-only.")
    e.add_argument("workdir", help="the workdir of a run (clax run --workdir)")
    e.add_argument("--json", action="store_true", help="print JSON. Default: off (text)")
    e.set_defaults(func=cmd_eval)
