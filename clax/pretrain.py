"""Where a frozen backbone comes from when no pretrained checkpoint is at hand: a short, offline,
supervised pretraining on synthetic glyphs, cached on disk.

What data. ``synthetic_glyphs`` draws ``num_classes`` (16) random glyph prototypes from a seed, each
made of 2-4 straight pen strokes on an 8x8 canvas, and samples them with a random shift of up to one
pixel, random thickening, random intensity, pixel dropout and Gaussian noise. The images go through
the same view as the digits benchmarks (8x8 values in [0, 1], each pixel repeated 4x4 and over RGB
for image backbones; flat 64-vectors for the MLP). No digit image and no digit label is used, so the
pretraining data is disjoint from every continual stream in clax: the backbone knows 8x8 pen strokes
in general, not the digits. (Pretraining on part of the digits would leak the stream's classes into
the "frozen" features; pixel-permuted digits would still be the stream's images and labels.)

How long. ``steps`` Adam steps (lr 1e-3, batch 32) of backbone + linear head from a random
initialisation; the defaults of the methods that use it take 10-30 s on 2 CPU cores.

What accuracy. The report (returned, written beside the weights as JSON and kept in results by the
methods that use it) gives the accuracy on 20% held-out glyphs; on the methods' default backbones it
is reported in the README and BENCHMARKS.md.

Which weights (:func:`pretrained_backbone`, the methods' setting ``pretrained``). A checkpoint the user
gives (``backbone.pretrained=PATH``) is frozen exactly as loaded, bit for bit: glyph pretraining runs
only when no checkpoint is given (``"auto"``, the default, or ``"glyphs"``; ``"glyphs"`` together with
a checkpoint is refused, naming both settings), and ``"none"`` without a checkpoint is the random
initialisation. The report (``results.json``'s ``pretrain``) says which: ``source`` is ``"file"`` (with
the file's absolute ``path`` and ``sha256``), ``"glyphs"`` or ``"random"``.

Cache. Weights and report are written to ``cache_dir`` (a run's workdir: ``<workdir>/pretrain``) under a
name hashed from the backbone's definition and the pretraining settings, as Flax msgpack (no pickle),
and reused by later runs; within one process the result is also kept in memory. Both files are written
atomically (temporary file, fsync, rename), the report last with the weights' SHA-256, so a run killed
while writing leaves no part of a cache. A cache that is damaged anyway (a part missing, unreadable,
not matching its checksum, or written by an older clax without one) is named in one line on stderr,
set aside as ``<name>.damaged-N`` (never deleted) and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.models import Backbone
from clax.transforms import classifier
from clax.workdir import atomic_write, remove_stale_temps, say, set_aside

PyTree = Any
_MEMO: dict[str, tuple] = {}


def _stroke(img: np.ndarray, p0, p1, value: float = 1.0) -> None:
    for s in np.linspace(0.0, 1.0, 17):
        r, c = np.rint(np.asarray(p0) + s * (np.asarray(p1) - np.asarray(p0))).astype(int)
        img[r, c] = value


def synthetic_glyphs(n_per_class: int, num_classes: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x [N, 8, 8] float32 in [0, 1], y [N] int32)``: random stroke glyphs (see the module docstring)."""
    rng = np.random.default_rng([seed, 7])
    protos = []
    for _ in range(num_classes):
        img = np.zeros((8, 8), np.float32)
        for _ in range(rng.integers(2, 5)):
            _stroke(img, rng.integers(1, 7, 2), rng.integers(1, 7, 2))
        protos.append(img)
    xs, ys = [], []
    for c, proto in enumerate(protos):
        for _ in range(n_per_class):
            img = proto.copy()
            if rng.random() < 0.3:  # thicker pen
                img = np.maximum(img, 0.6 * np.roll(img, 1, axis=int(rng.integers(0, 2))))
            img = np.roll(img, tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
            img = img * rng.uniform(0.6, 1.0) * (rng.random((8, 8)) > 0.1)
            img = np.clip(img + rng.normal(0.0, 0.05, (8, 8)), 0.0, 1.0)
            xs.append(img.astype(np.float32))
            ys.append(c)
    return np.stack(xs), np.asarray(ys, np.int32)


def to_view(x8: np.ndarray, input_shape) -> np.ndarray:
    """8x8 images ``[N, 8, 8]`` in the digits benchmarks' view for ``input_shape`` ((64,) or (H, W, C))."""
    input_shape = tuple(input_shape)
    if input_shape == (64,):
        return x8.reshape(len(x8), 64)
    h, w, ch = input_shape
    if h % 8 or w % 8:
        raise ValueError(f"pretraining glyphs are 8x8; input shape {input_shape} is not a multiple")
    img = np.repeat(np.repeat(x8, h // 8, axis=1), w // 8, axis=2)
    return np.repeat(img[..., None], ch, axis=-1).astype(np.float32)


def cache_key(backbone: Backbone, steps: int, seed: int) -> str:
    """A name for the pretrained weights of ``backbone`` under these settings."""
    desc = repr((repr(backbone.module), tuple(backbone.input_shape), steps, seed, "glyphs-v1"))
    return f"{backbone.name}-glyphs-{hashlib.sha256(desc.encode()).hexdigest()[:12]}"


def pretrain(backbone: Backbone, steps: int = 300, seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
             num_classes: int = 16, n_per_class: int = 250) -> tuple[PyTree, PyTree, dict]:
    """Supervised pretraining of ``backbone`` + a linear head on synthetic glyphs.

    Returns:
      ``(params, batch_stats, report)``; the report names the data, the steps and the held-out accuracy.
    """
    if steps < 1:
        raise ValueError(f"pretrain steps must be >= 1, got {steps}")
    if backbone.pretrained:
        raise ValueError(f"glyph pretraining starts from a random initialisation, but the backbone was built "
                         f"with backbone.pretrained={backbone.pretrained!r} (a given checkpoint is frozen "
                         f"exactly as loaded, never pretrained further)")
    t0 = time.perf_counter()
    x8, y = synthetic_glyphs(n_per_class, num_classes, seed)
    x = to_view(x8, backbone.input_shape)
    rng = np.random.default_rng([seed, 11])
    perm = rng.permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    kb, kh = jax.random.split(jax.random.PRNGKey(seed))
    params, stats = backbone.init(kb)
    head = classifier.init_head(kh, backbone.feature_dim, num_classes)
    tx = optax.adam(lr)
    tr_vars = {"backbone": params, "head": head}
    opt = tx.init(tr_vars)

    @jax.jit
    def step(v, stats, opt, xb, yb):
        def loss_fn(v):
            f, new = backbone.apply(v["backbone"], stats, xb, True)
            return classifier.cross_entropy(classifier.head_logits(v["head"], f), yb), new
        (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(v)
        upd, opt = tx.update(g, opt, v)
        return optax.apply_updates(v, upd), new, opt, loss

    @jax.jit
    def correct(v, stats, xb, yb):
        f, _ = backbone.apply(v["backbone"], stats, xb, False)
        return jnp.sum(jnp.argmax(classifier.head_logits(v["head"], f), -1) == yb)

    for i in range(steps):
        if i % (len(tr) // batch_size) == 0:
            order = rng.permutation(tr)
        j = (i % (len(tr) // batch_size)) * batch_size
        b = order[j:j + batch_size]
        tr_vars, stats, opt, loss = step(tr_vars, stats, opt, x[b], y[b])

    def accuracy(idx):
        return float(sum(correct(tr_vars, stats, x[idx[s:s + 256]], y[idx[s:s + 256]])
                         for s in range(0, len(idx), 256))) / len(idx)

    report = {
        "data": f"synthetic stroke glyphs, {num_classes} classes x {n_per_class} samples (seed {seed}); "
                "no digit images or labels",
        "train_samples": int(len(tr)), "heldout_samples": int(n_test), "steps": int(steps),
        "batch_size": int(batch_size), "optimizer": f"adam lr {lr}", "final_loss": float(loss),
        "heldout_accuracy": accuracy(te), "seconds": round(time.perf_counter() - t0, 1),
    }
    return tr_vars["backbone"], stats, report


def _check_tree(backbone: Backbone, params: PyTree, stats: PyTree, source: str) -> None:
    want_p, want_s = jax.eval_shape(backbone.init, jax.random.PRNGKey(0))
    for name, want, got in (("params", want_p, params), ("batch_stats", want_s, stats)):
        fw = flax.traverse_util.flatten_dict(want) if want else {}
        fg = flax.traverse_util.flatten_dict(got) if got else {}
        for k in set(fw) | set(fg):
            path = "/".join(k)
            if k not in fg or k not in fw or tuple(fg[k].shape) != tuple(fw[k].shape):
                raise ValueError(f"pretrained weights {source!r} do not fit backbone {backbone.name!r}: "
                                 f"{name}/{path} is {tuple(fg[k].shape) if k in fg else 'missing'}, expected "
                                 f"{tuple(fw[k].shape) if k in fw else 'absent'}")


def _report_path(path: str) -> str:
    return path[: -len(".msgpack")] + ".json" if path.endswith(".msgpack") else path + ".json"


def save(path: str, params: PyTree, stats: PyTree, report: dict | None = None) -> None:
    """Writes ``{"params", "batch_stats"}`` as Flax msgpack to ``path`` and, with a ``report``, the
    report as JSON beside it (``.msgpack`` -> ``.json``) with the weights file's ``weights_sha256``.

    Both files are written atomically (:func:`clax.workdir.atomic_write`), the weights first: a process
    killed meanwhile leaves the previous files or none, never a part of one.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"params": jax.tree.map(np.asarray, params), "batch_stats": jax.tree.map(np.asarray, stats)}
    data = flax.serialization.msgpack_serialize(state)
    atomic_write(path, data)
    if report is not None:
        atomic_write(_report_path(path),
                     json.dumps({**report, "weights_sha256": hashlib.sha256(data).hexdigest()}, indent=1))


def _unpack(data: bytes, path: str) -> dict:
    try:
        state = flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack raises several kinds
        raise ValueError(f"pretrained weights {path!r} are not a readable Flax msgpack file "
                         f"({' '.join(str(e).split()) or type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights {path!r} are not a Flax msgpack dict of params and batch_stats")
    return state


def load(path: str, backbone: Backbone) -> tuple[PyTree, PyTree]:
    """Reads weights written by :func:`save` and checks that they fit ``backbone``.

    Raises:
      ValueError: the file is missing or unreadable, or a parameter is missing or has the wrong shape
        (named).
    """
    if not os.path.isfile(path):
        raise ValueError(f"pretrained weights {path!r}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    state = _unpack(data, path)
    params, stats = state.get("params", {}), state.get("batch_stats", {}) or {}
    _check_tree(backbone, params, stats, path)
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats)


#: values of a frozen-backbone method's ``pretrained`` setting besides a path (see :func:`pretrained_backbone`)
SOURCES = ("auto", "glyphs", "none")


def _file_report(kind: str, path: str, sha256: str) -> dict:
    return {"data": f"{kind} {os.path.abspath(path)} (frozen exactly as loaded; no pretraining)", "source": "file",
            "path": os.path.abspath(path), "sha256": sha256, "steps": 0}


def pretrained_backbone(backbone: Backbone, source: str = "auto", steps: int = 300, seed: int = 0,
                        cache_dir: str = "", setting: str = "pretrained") -> tuple[PyTree, PyTree, dict]:
    """The frozen backbone's ``(params, batch_stats, report)``.

    A checkpoint the user gives is frozen exactly as loaded: glyph pretraining runs only when no
    checkpoint is given, and the report then names the file (absolute path) and its SHA-256.

    Args:
      backbone: the backbone; ``backbone.pretrained`` is the checkpoint it was built with
        (``backbone.pretrained=PATH``), ``""`` for none.
      source:
        ``"auto"``: the backbone's checkpoint where it has one, else ``"glyphs"``.
        ``"glyphs"``: offline pretraining on synthetic glyphs (see the module docstring); refused when
        the backbone has a checkpoint (the two settings contradict each other).
        ``"none"``: no pretraining: the backbone's checkpoint where it has one, else its random
        initialisation (key ``seed``; for ablations and fast tests); the report says which.
        A path: a ``.msgpack`` written by :func:`save`; refused when the backbone has a checkpoint too.
      steps, seed: pretraining settings (``"glyphs"`` only; ``seed`` also keys the random initialisation).
      cache_dir: where pretrained weights are cached (``""``: only in this process's memory).
      setting: the setting's name for error messages (``"clr.pretrained"``).

    Raises:
      ValueError: a contradictory combination, naming both settings; a missing or unfitting file.
    """
    ckpt = backbone.pretrained
    if ckpt:
        if source in ("auto", "none"):
            params, stats = backbone.init(jax.random.PRNGKey(seed))  # the loaded arrays, untouched
            return params, stats, _file_report("checkpoint", ckpt, backbone.pretrained_sha256)
        what = ("pretrain the backbone on synthetic glyphs" if source == "glyphs"
                else f"load other weights from {source!r}")
        raise ValueError(f"{setting}={source!r} would {what}, but backbone.pretrained={ckpt!r} gives the "
                         f"weights to freeze, and a given checkpoint is frozen exactly as loaded: set "
                         f"{setting}=auto (or none) to use the checkpoint, or unset backbone.pretrained")
    if source == "none":
        params, stats = backbone.init(jax.random.PRNGKey(seed))
        return params, stats, {"data": f"none (random initialisation, key {seed}; no checkpoint, no pretraining)",
                               "source": "random", "seed": int(seed), "steps": 0}
    if source not in ("auto", "glyphs"):
        from clax.models.pretrained import file_sha256

        if not os.path.isfile(source):
            raise ValueError(f"{setting}={source!r}: no such file (valid: a .msgpack written by "
                             f"clax.pretrain.save, or one of {', '.join(SOURCES)})")
        digest = file_sha256(source)
        params, stats = load(source, backbone)
        return params, stats, _file_report("clax weights", source, digest)
    key = cache_key(backbone, steps, seed)
    if key in _MEMO:
        return _MEMO[key]
    path = os.path.join(cache_dir, key + ".msgpack") if cache_dir else ""
    found = _read_cache(path, backbone) if path else None
    if found is not None:
        params, stats, report = found
    else:
        params, stats, report = pretrain(backbone, steps, seed)
        report = {"source": "glyphs", **report}
        if path:
            save(path, params, stats, report)
    _MEMO[key] = (params, stats, report)
    return _MEMO[key]


def _read_cache(path: str, backbone: Backbone) -> tuple[PyTree, PyTree, dict] | None:
    """The cached ``(params, batch_stats, report)`` at ``path`` (weights) and its ``.json`` (report with
    the weights' SHA-256), or None when there is no cache. A damaged cache (a part missing, unreadable,
    or not matching its checksum) is named in one line on stderr and set aside (renamed
    ``<name>.damaged-N``, never deleted), and None is returned so that it is rebuilt. Temporary files
    of a writer killed mid-write are removed."""
    rpath = _report_path(path)
    for p in (path, rpath):
        remove_stale_temps(p)
    if not os.path.lexists(path) and not os.path.lexists(rpath):
        return None
    try:
        if not os.path.isfile(path):
            raise ValueError(f"the weights file is missing beside {os.path.basename(rpath)}")
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise ValueError("the weights file is empty (a write was cut off)")
        try:
            with open(rpath) as f:
                report = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"its report {os.path.basename(rpath)} is missing") from None
        except ValueError as e:
            raise ValueError(f"its report {os.path.basename(rpath)} is not valid JSON: {e}") from None
        want = report.get("weights_sha256") if isinstance(report, dict) else None
        if not want:
            raise ValueError("its report has no checksum (written by an older clax)")
        if hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"the weights file ({len(data)} bytes) does not match the SHA-256 in its report")
        state = _unpack(data, path)
        params, stats = state.get("params", {}), state.get("batch_stats", {}) or {}
        _check_tree(backbone, params, stats, path)
    except (OSError, ValueError) as e:
        moved = [set_aside(p) for p in (path, rpath) if os.path.lexists(p)]
        say(f"pretraining cache {path} is damaged ({' '.join(str(e).split())}); set aside as "
             f"{' and '.join(moved)}; pretraining again")
        return None
    report = {"source": "glyphs", **{k: v for k, v in report.items() if k != "weights_sha256"}, "cached": path}
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats), report
