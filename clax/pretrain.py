"""Where a frozen backbone comes from when no pretrained checkpoint is at hand: a short, offline,
supervised pretraining on synthetic glyphs, or on real images (CIFAR-10 class folders), cached on disk.

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

Real images. ``pretrained="cifar10"`` (:func:`pretrain_cifar10`) pretrains the backbone + a linear head
on the training split of a CIFAR-10 class folder (the methods' setting ``pretrain_data_dir``, e.g.
../shared/data/cifar10-images.tar.gz extracted), resized to the backbone's input size, with CIFAR-10
normalisation and crop + flip augmentation, for ``pretrain_steps`` Adam steps (lr 1e-3, batch 64); the
report gives the accuracy on the whole CIFAR-10 test split. It is for the real-image streams
(``split-tinyimagenet32``): a different data set, so the frozen features have seen none of the stream's
images or labels. The glyph defaults of ``pretrain_steps`` (120-300) are far too few for it: use 1000
or more.

Which weights (:func:`pretrained_backbone`, the methods' setting ``pretrained``). A checkpoint the user
gives (``backbone.pretrained=PATH``) is frozen exactly as loaded, bit for bit: glyph pretraining runs
only when no checkpoint is given (``"auto"``, the default, or ``"glyphs"``; ``"glyphs"`` together with
a checkpoint is refused, naming both settings), and ``"none"`` without a checkpoint is the random
initialisation. The report (``results.json``'s ``pretrain``) says which: ``source`` is ``"file"`` (with
the file's absolute ``path`` and ``sha256``), ``"glyphs"``, ``"cifar10"`` or ``"random"``.

Cache. Weights and report are written to ``cache_dir`` (a run's workdir: ``<workdir>/pretrain``) and to
the user-level cache of :mod:`clax.cache` (``cache.pretrain``; read where the workdir has none) under a
name hashed from the backbone's definition and the pretraining settings (for CIFAR-10 also the folder's
file names and sizes, not its path), as Flax msgpack (no pickle),
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

from clax.models import Backbone, jit_init
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


def cache_key(backbone: Backbone, steps: int, seed: int, source: str = "glyphs", data: str = "") -> str:
    """A name for the pretrained weights of ``backbone`` under these settings: ``source`` is ``"glyphs"``
    or ``"cifar10"`` (then ``data`` is the folder's fingerprint, :func:`cifar10_folder`)."""
    parts = (repr(backbone.module), tuple(backbone.input_shape), steps, seed, "glyphs-v1")
    if source != "glyphs":
        parts = parts[:-1] + (f"{source}-v1", data)
    return f"{backbone.name}-{source}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:12]}"


def cpu_threads_tag() -> str:
    """``"-cpuN"`` on the CPU backend, N the cores this process may use (which XLA sizes its thread pools
    by), else ``""``: the shared pretraining cache's entries carry it, because XLA's CPU results depend
    in the last bits on the thread count (the main job's workers run on one core each, a single
    ``clax run`` on every core), so that a cached backbone is the one this process would pretrain. A
    workdir's own ``pretrain/`` copy is keyed without it: a resumed run keeps its own weights."""
    from clax.cache import usable_cores

    return f"-cpu{len(usable_cores())}" if jax.default_backend() == "cpu" else ""


def _check_start(backbone: Backbone, steps: int, what: str) -> None:
    """Refuses a pretraining (``what``: its data) of fewer than one step or of a backbone built from a
    given checkpoint, which is frozen exactly as loaded."""
    if steps < 1:
        raise ValueError(f"pretrain steps must be >= 1, got {steps}")
    if backbone.pretrained:
        raise ValueError(f"{what} pretraining starts from a random initialisation, but the backbone was built "
                         f"with backbone.pretrained={backbone.pretrained!r} (a given checkpoint is frozen "
                         f"exactly as loaded, never pretrained further)")


def pretrain(backbone: Backbone, steps: int = 300, seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
             num_classes: int = 16, n_per_class: int = 250) -> tuple[PyTree, PyTree, dict]:
    """Supervised pretraining of ``backbone`` + a linear head on synthetic glyphs.

    Returns:
      ``(params, batch_stats, report)``; the report names the data, the steps and the held-out accuracy.
    """
    _check_start(backbone, steps, "glyph")
    t0 = time.perf_counter()
    x8, y = synthetic_glyphs(n_per_class, num_classes, seed)
    x = to_view(x8, backbone.input_shape)
    rng = np.random.default_rng([seed, 11])
    perm = rng.permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]

    def batches():
        order = None
        for i in range(steps):
            if i % (len(tr) // batch_size) == 0:
                order = rng.permutation(tr)
            j = (i % (len(tr) // batch_size)) * batch_size
            b = order[j:j + batch_size]
            yield x[b], y[b]

    tr_vars, stats, loss, correct = _supervised(backbone, num_classes, batches(), lr, seed)

    def accuracy(idx):
        return correct(x[idx], y[idx], 256) / len(idx)

    report = {
        "data": f"synthetic stroke glyphs, {num_classes} classes x {n_per_class} samples (seed {seed}); "
                "no digit images or labels",
        "train_samples": int(len(tr)), "heldout_samples": int(n_test), "steps": int(steps),
        "batch_size": int(batch_size), "optimizer": f"adam lr {lr}", "final_loss": float(loss),
        "heldout_accuracy": accuracy(te), "seconds": round(time.perf_counter() - t0, 1),
    }
    return tr_vars["backbone"], stats, report


#: what ``pretrain_cifar10`` expects in its folder (named in its errors)
CIFAR10_LAYOUT = ("train/<class>/*.jpg and test/<class>/*.jpg, 10 class folders (e.g. "
                  "../shared/data/cifar10-images.tar.gz extracted)")


def _cifar10_view(backbone: Backbone) -> tuple[str, int]:
    """``(view, image size)`` in which ``backbone`` reads CIFAR-10 images (resized where it reads another size)."""
    shape = tuple(backbone.input_shape)
    if len(shape) == 3 and shape[0] == shape[1] and shape[2] == 3:
        return "image", int(shape[0])
    if len(shape) == 1 and shape[0] % 3 == 0 and round((shape[0] // 3) ** 0.5) ** 2 * 3 == shape[0]:
        return "flat", int(round((shape[0] // 3) ** 0.5))
    raise ValueError(f"CIFAR-10 pretraining needs a backbone that reads square RGB images (H, H, 3) or their "
                     f"flat H*H*3 vectors; backbone {backbone.name!r} reads {shape}")


def cifar10_folder(data_dir: str):
    """``(train (paths, labels), test (paths, labels), class names, fingerprint)`` of a CIFAR-10 class
    folder (:data:`CIFAR10_LAYOUT`). The fingerprint is a SHA-256 of every file's relative path and size
    (what the pretraining cache is keyed on, so another copy of the same files shares it).

    Raises:
      ValueError: a missing or malformed folder, or not 10 classes, naming the layout.
    """
    from clax.data.folder import scan_split

    try:
        ptr, ytr, classes = scan_split(data_dir, "train")
        pte, yte, _ = scan_split(data_dir, "test", classes)
    except ValueError as e:
        raise ValueError(f"{e} (CIFAR-10 pretraining reads {CIFAR10_LAYOUT})") from None
    if len(classes) != 10:
        raise ValueError(f"{data_dir}/train has {len(classes)} class folders ({', '.join(classes[:12])}); "
                         f"CIFAR-10 pretraining expects {CIFAR10_LAYOUT}")
    h = hashlib.sha256()
    for path in ptr + pte:
        h.update(f"{os.path.relpath(path, data_dir)}\0{os.path.getsize(path)}\n".encode())
    return (ptr, ytr), (pte, yte), classes, h.hexdigest()


def pretrain_cifar10(backbone: Backbone, data_dir: str, steps: int = 2000, seed: int = 0, batch_size: int = 64,
                     lr: float = 1e-3, folder=None) -> tuple[PyTree, PyTree, dict]:
    """Supervised pretraining of ``backbone`` + a linear head on CIFAR-10 images from class folders.

    Data: the ``train`` split of ``data_dir`` (:data:`CIFAR10_LAYOUT`), resized to the backbone's input
    size where it differs from 32 (flattened for an MLP), normalised with the CIFAR-10 channel statistics
    (the image benchmarks' default normalisation; Tiny-ImageNet's statistics differ by less than 0.05),
    with the CIFAR-style augmentation (4-pixel zero padding, random crop, horizontal flip). CIFAR-10's
    classes (vehicles and animals at 32x32) are a different data set from every continual stream in
    clax; none of its images is in Tiny-ImageNet, though some of its concepts are (Tiny-ImageNet has
    e.g. a sports car and a tabby cat), as with any ImageNet-pretrained backbone.

    Training: ``steps`` Adam steps (``lr``, batches of ``batch_size`` drawn without replacement, epoch
    after epoch, from a permutation seeded by ``seed``); the initialisation is keyed by ``seed``.

    Held out: the accuracy on the whole ``test`` split (10,000 images in CIFAR-10), never trained on.

    Args:
      folder: the result of :func:`cifar10_folder` for ``data_dir`` when the caller has it.

    Returns:
      ``(params, batch_stats, report)``; the report names the data, the steps and the held-out accuracy.
    """
    from clax.data.folder import FileReader
    from clax.data.pipeline import CIFAR_MEAN, CIFAR_STD, ImageSource, make_preprocess, prefetch

    _check_start(backbone, steps, "CIFAR-10")
    t0 = time.perf_counter()
    view, size = _cifar10_view(backbone)
    (ptr, ytr), (pte, yte), classes, _ = folder or cifar10_folder(data_dir)
    pre_tr, pre_te = make_preprocess(view, 32, 3, size, CIFAR_MEAN, CIFAR_STD, True)
    src_tr = ImageSource([(FileReader(ptr), np.arange(len(ptr)))], pre_tr, augment=True, seed=seed)
    src_te = ImageSource([(FileReader(pte), np.arange(len(pte)))], pre_te)
    ytr, yte = np.asarray(ytr, np.int32), np.asarray(yte, np.int32)
    rng = np.random.default_rng([seed, 13])
    per_epoch = max(1, len(ytr) // batch_size)

    def batches():
        order = None
        for i in range(steps):
            if i % per_epoch == 0:
                order = rng.permutation(len(ytr))
            b = order[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size]
            yield src_tr[b], ytr[b]

    tr_vars, stats, loss, correct = _supervised(backbone, len(classes), prefetch(batches()), lr, seed)
    right = correct(src_te, yte, 500)
    report = {
        "data": f"CIFAR-10 class folders {os.path.abspath(data_dir)}: train split, {len(ytr)} images of "
                f"{len(classes)} classes ({', '.join(classes)}), {size}x{size}, CIFAR-10 normalisation, crop "
                f"and flip augmentation; held out: the test split",
        "classes": list(classes), "train_samples": int(len(ytr)), "heldout_samples": int(len(yte)),
        "image_size": int(size), "steps": int(steps), "epochs": round(steps * batch_size / len(ytr), 2),
        "batch_size": int(batch_size), "optimizer": f"adam lr {lr}", "final_loss": float(loss),
        "heldout_accuracy": right / len(yte), "seconds": round(time.perf_counter() - t0, 1),
    }
    return tr_vars["backbone"], stats, report


def _init(backbone: Backbone):
    """The backbone's init compiled as one program (:func:`clax.models.jit_init`): bit for bit the eager
    init, which the pretrained weights came from (tests/test_pretrained.py checks the ResNets and the
    ViT). Eagerly, every distinct weight shape compiles its own draw: 12 programs and about 5.5 s of a
    cold CLR run on 2 cores. (The ViT's jitted init matches its eager one since its ``pos_embed``
    draw keeps its scaling apart, :func:`clax.models.vit.scaled_normal`.)"""
    return jit_init(backbone.init)


def _supervised(backbone: Backbone, num_classes: int, batches, lr: float, seed: int):
    """Adam (``lr``) on backbone + a linear head from a random initialisation (key ``seed``), one step per
    ``(x, y)`` of ``batches``. Returns ``(variables {"backbone", "head"}, batch_stats, last loss,
    correct)``, where ``correct(x, y, chunk)`` counts the right eval-mode predictions over all rows of ``x``
    (an array or a lazy image source), read in chunks of ``chunk`` rows."""
    kb, kh = jax.random.split(jax.random.PRNGKey(seed))
    params, stats = _init(backbone)(kb)
    head = classifier.init_head(kh, backbone.feature_dim, num_classes)
    tx = optax.adam(lr)
    tr_vars = {"backbone": params, "head": head}
    opt = jit_init(tx.init)(tr_vars)  # zeros: one compiled program, not an eager one per leaf shape

    @jax.jit
    def step(v, stats, opt, xb, yb):
        def loss_fn(v):
            f, new = backbone.apply(v["backbone"], stats, xb, True)
            return classifier.cross_entropy(classifier.head_logits(v["head"], f), yb), new
        (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(v)
        upd, opt = tx.update(g, opt, v)
        return optax.apply_updates(v, upd), new, opt, loss

    @jax.jit
    def _correct(v, stats, xb, yb, n):
        f, _ = backbone.apply(v["backbone"], stats, xb, False)
        right = jnp.argmax(classifier.head_logits(v["head"], f), -1) == yb
        return jnp.sum(right & (jnp.arange(yb.shape[0]) < n))  # the first n rows are real

    def correct(x, y, chunk: int) -> int:
        """The right predictions over every row of ``x``; the last, shorter chunk is padded to ``chunk``
        rows (one compilation for the whole set)."""
        right = 0
        for s in range(0, len(y), chunk):
            yb = np.asarray(y[s:s + chunk])
            pad = np.arange(chunk) % len(yb)
            right += int(_correct(tr_vars, stats, np.asarray(x[s:s + chunk])[pad], yb[pad], len(yb)))
        return right

    loss = float("nan")
    for xb, yb in batches:
        tr_vars, stats, opt, loss = step(tr_vars, stats, opt, xb, yb)
    return tr_vars, stats, loss, correct


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
SOURCES = ("auto", "glyphs", "cifar10", "none")


def _file_report(kind: str, path: str, sha256: str) -> dict:
    return {"data": f"{kind} {os.path.abspath(path)} (frozen exactly as loaded; no pretraining)", "source": "file",
            "path": os.path.abspath(path), "sha256": sha256, "steps": 0}


def pretrained_backbone(backbone: Backbone, source: str = "auto", steps: int = 300, seed: int = 0,
                        cache_dir: str = "", setting: str = "pretrained", data_dir: str = "",
                        data_setting: str = "pretrain_data_dir") -> tuple[PyTree, PyTree, dict]:
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
        ``"cifar10"``: offline supervised pretraining on the CIFAR-10 images in ``data_dir``
        (:func:`pretrain_cifar10`); refused, like ``"glyphs"``, when the backbone has a checkpoint.
        ``"none"``: no pretraining: the backbone's checkpoint where it has one, else its random
        initialisation (key ``seed``; for ablations and fast tests); the report says which.
        A path: a ``.msgpack`` written by :func:`save`; refused when the backbone has a checkpoint too.
      steps, seed: pretraining settings (``"glyphs"`` and ``"cifar10"``; ``seed`` also keys the random
        initialisation).
      cache_dir: where pretrained weights are cached (``""``: only in this process's memory).
      setting: the setting's name for error messages (``"clr.pretrained"``).
      data_dir, data_setting: the CIFAR-10 folder (``"cifar10"`` only) and its setting's name
        (``"clr.pretrain_data_dir"``).

    Raises:
      ValueError: a contradictory combination, naming both settings; a missing or unfitting file.
      clax.config.ConfigError: ``"cifar10"`` without ``data_dir`` or with a folder not in the CIFAR-10
        layout, naming ``data_setting`` and the layout.
    """
    ckpt = backbone.pretrained
    if ckpt:
        if source in ("auto", "none"):
            params, stats = backbone.init(jax.random.PRNGKey(seed))  # the loaded arrays, untouched
            return params, stats, _file_report("checkpoint", ckpt, backbone.pretrained_sha256)
        what = {"glyphs": "pretrain the backbone on synthetic glyphs", "cifar10": "pretrain the backbone on CIFAR-10"}.get(
            source, f"load other weights from {source!r}")
        raise ValueError(f"{setting}={source!r} would {what}, but backbone.pretrained={ckpt!r} gives the "
                         f"weights to freeze, and a given checkpoint is frozen exactly as loaded: set "
                         f"{setting}=auto (or none) to use the checkpoint, or unset backbone.pretrained")
    if source == "none":
        params, stats = backbone.init(jax.random.PRNGKey(seed))
        return params, stats, {"data": f"none (random initialisation, key {seed}; no checkpoint, no pretraining)",
                               "source": "random", "seed": int(seed), "steps": 0}
    if source not in ("auto", "glyphs", "cifar10"):
        from clax.models.pretrained import file_sha256

        if not os.path.isfile(source):
            raise ValueError(f"{setting}={source!r}: no such file (valid: a .msgpack written by "
                             f"clax.pretrain.save, or one of {', '.join(SOURCES)})")
        digest = file_sha256(source)
        params, stats = load(source, backbone)
        return params, stats, _file_report("clax weights", source, digest)
    folder = None
    if source == "cifar10":
        from clax.config import ConfigError

        if not data_dir:
            raise ConfigError(f"{setting}=cifar10 needs {data_setting}: a CIFAR-10 folder with {CIFAR10_LAYOUT}")
        try:
            _cifar10_view(backbone)
            folder = cifar10_folder(data_dir)
        except ValueError as e:
            raise ConfigError(f"{data_setting}={data_dir!r}: {e}") from None
        key = cache_key(backbone, steps, seed, "cifar10", folder[3])
    else:
        source, key = "glyphs", cache_key(backbone, steps, seed)
    if key in _MEMO:
        return _MEMO[key]
    path = os.path.join(cache_dir, key + ".msgpack") if cache_dir else ""
    found = _read_cache(path, backbone, source) if path else None
    from clax.cache import shared_pretrain_dir

    shared_dir = shared_pretrain_dir() if path else None
    shared = os.path.join(shared_dir, key + cpu_threads_tag() + ".msgpack") if shared_dir else ""
    if found is None and shared and os.path.abspath(shared) != os.path.abspath(path):
        found = _read_cache(shared, backbone, source)  # the user-level cache (clax.cache, cache.pretrain)
        if found is not None:  # the workdir keeps its own copy, so that it stands alone
            save(path, found[0], found[1], {k: v for k, v in found[2].items() if k != "cached"})
    if found is not None:
        params, stats, report = found
    else:
        if source == "cifar10":
            params, stats, report = pretrain_cifar10(backbone, data_dir, steps, seed, folder=folder)
        else:
            params, stats, report = pretrain(backbone, steps, seed)
        report = {"source": source, **report}
        if path:
            save(path, params, stats, report)
        if shared:
            try:
                save(shared, params, stats, report)
            except OSError as e:  # a full or read-only user cache costs the next run a pretraining, no more
                say(f"could not write the shared pretraining cache {shared}: {e}")
    _MEMO[key] = (params, stats, report)
    return _MEMO[key]


def _read_cache(path: str, backbone: Backbone, source: str = "glyphs") -> tuple[PyTree, PyTree, dict] | None:
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
             f"{' and '.join(moved)}; pretraining again (or copying the shared cache's)")
        return None
    report = {"source": source, **{k: v for k, v in report.items() if k != "weights_sha256"}, "cached": path}
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, stats), report
