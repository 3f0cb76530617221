"""The input pipeline for data sets too large to hold in memory: lazy image sources and prefetching.

An :class:`ImageSource` behaves like a read-only float32 array ``[N, *shape]`` (``shape``, ``ndim``,
``len``, integer/slice/index-array ``[]``) but decodes, resizes, augments and normalises images only
when indexed. :class:`~clax.data.Task` accepts one wherever it takes an array, so a
:class:`~clax.data.Benchmark` whose tasks hold sources is consumed by the unchanged trainer:
``train_batches``/``eval_batches`` index it batch by batch, and ``np.concatenate`` of sources (the
trainer's ``task_training_data``) returns a concatenated source instead of the pixels.

Preprocessing (:class:`Preprocess`) is per backbone (:func:`preprocessing_for`): resize (224 for
ImageNet-pretrained ViTs), normalisation, and for training sources the CIFAR-style random crop
(zero padding) and horizontal flip. Augmentation draws come from ``(seed, call number)``, so a fresh
benchmark built with the same seed yields the same batches. :func:`prefetch` runs a batch iterator
in a background thread so that decoding overlaps the compiled train step.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np

#: Channel statistics of common pre-training and data sets (RGB, for pixels scaled to [0, 1]).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

#: ``reader(indices) -> list of uint8 images [H, W, C]`` (sizes may differ between images).
Reader = Callable[[Sequence[int]], list]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What happens to a decoded uint8 image ``[H, W, C]`` on its way into a batch.

    Attributes:
      size: output height and width (images are resized bilinearly to ``size x size``).
      channels: 3 (grey images are repeated over RGB) or 1 (colour images are averaged).
      mean, std: per-channel normalisation of pixels scaled to [0, 1]; ``None`` leaves [0, 1].
      crop_pad: training only: zero-pad by this many pixels, then crop ``size`` at random (0 = off).
      flip: training only: flip horizontally with probability 1/2.
      flat: return ``[size * size * channels]`` vectors instead of ``[size, size, channels]``.
      permutation: a fixed permutation of the ``size * size`` pixel positions (permuted-MNIST).
    """

    size: int
    channels: int = 3
    mean: tuple | None = None
    std: tuple | None = None
    crop_pad: int = 0
    flip: bool = False
    flat: bool = False
    permutation: tuple | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one preprocessed image: ``(size, size, channels)``, or ``(size * size * channels,)`` flat."""
        s = (self.size, self.size, self.channels)
        return (int(np.prod(s)),) if self.flat else s


def preprocessing_for(backbone: str, settings: dict | None = None) -> dict:
    """Benchmark keyword arguments that suit ``backbone`` (an empty dict when the defaults suit it).

    An ImageNet-pretrained ViT (``backbone.pretrained`` set) sees 224 x 224 inputs normalised as its
    checkpoint expects (CLIP statistics for a CLIP tower, [-1, 1] for augreg/timm); a pretrained
    ResNet sees ImageNet statistics. Untrained backbones keep the data set's own size and statistics.
    """
    settings = settings or {}
    path = str(settings.get("pretrained", "") or "")
    if not path:
        return {}
    if backbone == "vit":
        from clax.models.pretrained import checkpoint_kind

        clip = checkpoint_kind(path) == "clip"
        return {"image_size": 224, "mean": CLIP_MEAN if clip else HALF, "std": CLIP_STD if clip else HALF}
    if backbone.startswith("resnet"):
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return {}


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from PIL import Image

    squeeze = img.ndim == 3 and img.shape[-1] == 1
    pil = Image.fromarray(img[..., 0] if squeeze else img)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def _channels(img: np.ndarray, c: int) -> np.ndarray:
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == c:
        return img
    if c == 3 and img.shape[-1] == 1:
        return np.repeat(img, 3, axis=-1)
    if c == 3 and img.shape[-1] == 4:
        return img[..., :3]
    if c == 1:
        return img[..., :3].mean(-1, keepdims=True).astype(np.uint8)
    raise ValueError(f"cannot turn an image with {img.shape[-1]} channels into {c}")


class ImageSource:
    """A lazy, read-only float32 array of preprocessed images ``[N, *pre.shape]``.

    Args:
      segments: ``[(reader, indices)]``; position ``i`` of the source is record ``indices[i]`` of its
        segment's reader (positions run through the segments in order).
      pre: the :class:`Preprocess`.
      augment: apply the training augmentation (random crop, flip) of ``pre``.
      seed: seeds the augmentation draws.
      workers: decoding threads per gather.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, segments, pre: Preprocess, augment: bool = False, seed: int = 0, workers: int = 2):
        self.segments = [(r, np.asarray(i, np.int64)) for r, i in segments]
        self.pre, self.augment, self.seed, self.workers = pre, bool(augment), seed, workers
        self._offsets = np.cumsum([0] + [len(i) for _, i in self.segments])
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, ...]:
        """``(number of images,) + `` the shape of one preprocessed image, as an array's."""
        return (int(self._offsets[-1]),) + self.pre.shape

    @property
    def ndim(self) -> int:
        """``len(shape)``, as an array's."""
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ImageSource(shape={self.shape}, augment={self.augment}, segments={len(self.segments)})"

    def take(self, positions) -> "ImageSource":
        """The sub-source at ``positions`` (indices or a boolean mask; no pixels are read)."""
        positions = np.asarray(positions)
        positions = np.flatnonzero(positions) if positions.dtype == bool else positions.astype(np.int64)
        seg = np.searchsorted(self._offsets, positions, side="right") - 1
        out = []
        for s in np.unique(seg):  # keeps order within each segment; callers pass sorted positions
            reader, idx = self.segments[s]
            out.append((reader, idx[positions[seg == s] - self._offsets[s]]))
        return ImageSource(out, self.pre, self.augment, self.seed, self.workers)

    def with_augment(self, augment: bool) -> "ImageSource":
        """The same images with the training augmentation switched on or off."""
        return ImageSource(self.segments, self.pre, augment, self.seed, self.workers)

    def _decode(self, positions: np.ndarray) -> np.ndarray:
        seg = np.searchsorted(self._offsets, positions, side="right") - 1
        imgs: list = [None] * len(positions)
        for s in np.unique(seg):
            where = np.flatnonzero(seg == s)
            reader, idx = self.segments[s]
            for w, img in zip(where, reader([int(v) for v in idx[positions[where] - self._offsets[s]]])):
                imgs[w] = img
        p = self.pre

        def one(img):
            return _resize(_channels(np.asarray(img), p.channels), p.size)

        if self.workers > 1 and len(imgs) > 16:
            with ThreadPoolExecutor(self.workers) as ex:
                imgs = list(ex.map(one, imgs))
        else:
            imgs = [one(i) for i in imgs]
        return np.stack(imgs) if imgs else np.zeros((0, p.size, p.size, p.channels), np.uint8)

    def _augment(self, x: np.ndarray) -> np.ndarray:
        p = self.pre
        with self._lock:
            rng = np.random.default_rng([self.seed, self._calls])
            self._calls += 1
        n = x.shape[0]
        if p.crop_pad:
            k = p.crop_pad
            padded = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)))
            dy, dx = rng.integers(0, 2 * k + 1, n), rng.integers(0, 2 * k + 1, n)
            rows = dy[:, None] + np.arange(p.size)[None]
            cols = dx[:, None] + np.arange(p.size)[None]
            x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if p.flip:
            f = rng.random(n) < 0.5
            x = np.where(f[:, None, None, None], x[:, :, ::-1], x)
        return x

    def _finish(self, x: np.ndarray) -> np.ndarray:
        p = self.pre
        x = x.astype(np.float32) / 255.0
        if p.permutation is not None:
            n = x.shape[0]
            x = x.reshape(n, -1, p.channels)[:, np.asarray(p.permutation)].reshape(x.shape)
        if p.mean is not None:
            x = (x - np.asarray(p.mean, np.float32)[: p.channels]) / np.asarray(p.std, np.float32)[: p.channels]
        return x.reshape((x.shape[0],) + p.shape)

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            return self[np.asarray([key])][0]
        if isinstance(key, slice):
            positions = np.arange(n)[key]
        else:
            positions = np.asarray(key)
            if positions.dtype == bool:
                positions = np.flatnonzero(positions)
            positions = positions.astype(np.int64)
            if positions.size and (positions.min() < -n or positions.max() >= n):
                raise IndexError(f"index out of range for a source of {n} images")
            positions = np.where(positions < 0, positions + n, positions)
        x = self._decode(positions)
        if self.augment:
            x = self._augment(x)
        return self._finish(x)

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([self[s:s + 1024] for s in range(0, max(len(self), 1), 1024)]) if len(self) else \
            np.zeros(self.shape, np.float32)
        return out.astype(dtype) if dtype is not None else out

    def __array_function__(self, func, types, args, kwargs):
        if func is np.concatenate:
            parts = args[0] if args else kwargs["arrays"]
            if all(isinstance(a, ImageSource) for a in parts):
                return concat(parts)
        conv = [np.asarray(a) if isinstance(a, ImageSource) else a for a in args]
        if func is np.concatenate:
            conv[0] = [np.asarray(a) for a in args[0]]
        return func(*conv, **kwargs)


def concat(sources: Sequence[ImageSource]) -> ImageSource:
    """The sources one after the other, still lazy (e.g. tasks 0..r for joint training)."""
    first = sources[0]
    if all(s.pre == first.pre and s.augment == first.augment and not isinstance(s, Stacked) for s in sources):
        return ImageSource([seg for s in sources for seg in s.segments], first.pre, first.augment, first.seed,
                           first.workers)
    return Stacked(sources)


class Stacked(ImageSource):
    """Sources with different preprocessing (e.g. permuted-MNIST tasks) one after the other."""

    def __init__(self, sources: Sequence[ImageSource]):
        shapes = {s.shape[1:] for s in sources}
        if len(shapes) != 1:
            raise ValueError(f"cannot concatenate image sources of shapes {sorted(shapes)}")
        self.sources = list(sources)
        self.pre, self.augment, self.segments = sources[0].pre, sources[0].augment, []
        self._offsets = np.cumsum([0] + [len(s) for s in sources])

    def take(self, positions) -> "Stacked":
        """The sub-source at ``positions`` (indices or a boolean mask; no pixels are read)."""
        positions = np.asarray(positions)
        positions = np.flatnonzero(positions) if positions.dtype == bool else positions.astype(np.int64)
        part = np.searchsorted(self._offsets, positions, side="right") - 1
        return Stacked([self.sources[p].take(positions[part == p] - self._offsets[p]) for p in np.unique(part)])

    def with_augment(self, augment: bool) -> "Stacked":
        """The same images with the training augmentation switched on or off."""
        return Stacked([s.with_augment(augment) for s in self.sources])

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            return self[np.asarray([key])][0]
        positions = np.arange(n)[key] if isinstance(key, slice) else np.asarray(key, np.int64) % max(n, 1)
        part = np.searchsorted(self._offsets, positions, side="right") - 1
        out = np.zeros((len(positions),) + self.shape[1:], np.float32)
        for p in np.unique(part):
            w = np.flatnonzero(part == p)
            out[w] = self.sources[p][positions[w] - self._offsets[p]]
        return out


def prefetch(it: Iterator, size: int = 2) -> Iterator:
    """Yields the items of ``it`` while a background thread computes up to ``size`` items ahead.

    Exceptions of the producer are re-raised in the consumer; abandoning the iterator stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    th = threading.Thread(target=produce, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def split_by_class(name: str, train: ImageSource, y_train, test: ImageSource, y_test, class_order,
                   class_names=None, num_classes: int | None = None):
    """A :class:`~clax.data.Benchmark` whose task ``t`` holds the images of classes ``class_order[t]``.

    Args:
      train, test: sources over all images of each split (``train`` augments, ``test`` does not).
      y_train, y_test: global labels ``[N]`` (int).
      class_order: ``[T][C_t]`` global class ids.
    """
    from clax.data.stream import Benchmark, Task

    y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    every = [c for cs in class_order for c in cs]
    if len(set(every)) != len(every):
        raise ValueError(f"class_order {class_order} repeats a class")
    if num_classes is None:
        num_classes = int(max(every) + 1)
    tasks = []
    for t, cs in enumerate(class_order):
        tr, te = np.flatnonzero(np.isin(y_train, cs)), np.flatnonzero(np.isin(y_test, cs))
        if not len(tr) or not len(te):
            split = "train" if not len(tr) else "test"
            raise ValueError(f"benchmark {name!r}: task {t} (classes {list(cs)}) has no {split} images")
        tasks.append(Task(t, tuple(int(c) for c in cs), train.take(tr), y_train[tr], test.take(te), y_test[te]))
    return Benchmark(name, tuple(tasks), int(num_classes), tuple(train.pre.shape),
                     tuple(class_names) if class_names is not None else None)


def class_order(num_classes: int, num_tasks: int, seed: int, name: str, kind: str = "seeded") -> list[list[int]]:
    """``num_classes`` classes cut into ``num_tasks`` equal tasks: a seed-drawn permutation (``kind="seeded"``)
    or the data set's label order 0, 1, ... (``"natural"``, the config's ``data.class_order``)."""
    if num_tasks < 1 or num_classes % num_tasks:
        raise ValueError(f"{name}: num_tasks={num_tasks} does not divide its {num_classes} classes")
    if kind == "natural":
        return np.arange(num_classes).reshape(num_tasks, -1).tolist()
    if kind != "seeded":
        raise ValueError(f"{name}: class_order={kind!r} is not valid; valid: seeded, natural")
    return np.random.default_rng(seed).permutation(num_classes).reshape(num_tasks, -1).tolist()


def make_preprocess(view: str, native_size: int, channels: int, image_size: int | None, mean, std,
                    augment: bool, permutation=None) -> tuple[Preprocess, Preprocess]:
    """The (train, test) :class:`Preprocess` of a view (``"flat"`` or ``"image"``). ``augment``: the training
    images' random crop and flip, with the crop's zero padding ``size // 8`` (4 pixels at 32) when ``True``,
    or that many pixels when an int > 0 (the config's ``data.crop_pad``)."""
    if view not in ("flat", "image"):
        raise ValueError(f"unknown view {view!r}; valid: flat, image")
    size = int(image_size or native_size)
    common = dict(size=size, channels=channels, mean=tuple(mean) if mean is not None else None,
                  std=tuple(std) if std is not None else None, flat=view == "flat",
                  permutation=tuple(int(v) for v in permutation) if permutation is not None else None)
    test = Preprocess(**common)
    # CIFAR-style augmentation: 4-pixel padding at 32 px, scaled with the image size.
    pad = int(augment) if not isinstance(augment, bool) and isinstance(augment, int) else max(1, size // 8)
    train = Preprocess(**common, crop_pad=pad if augment else 0, flip=bool(augment))
    return train, test


#: the config's ``data`` section: how a benchmark's images reach the network, where a protocol needs it
#: (``clax.config``; every value here leaves the benchmark's own default). ``image_size`` (0: the benchmark's
#: or backbone's size), ``normalize`` (``default``, ``none`` for [0, 1] pixels, ``cifar``, ``imagenet``,
#: ``half`` for [-1, 1]), ``augment`` (``default``, ``on``, ``off``: the CIFAR-style crop and flip of training
#: images), ``class_order`` (``seeded``: a permutation drawn from the run's seed; ``natural``: the data set's
#: label order), ``per_class`` (0: every training image; N: at most N training images of each class),
#: ``crop_pad`` (0: the augmentation's default padding, ``size // 8``, 4 pixels at 32; N: pad by N pixels
#: before the random crop, which turns the augmentation on).
DATA_DEFAULTS = {"image_size": 0, "normalize": "default", "augment": "default", "class_order": "seeded",
                 "per_class": 0, "crop_pad": 0}
DATA_CHOICES = {"normalize": ("default", "none", "cifar", "imagenet", "half"), "augment": ("default", "on", "off"),
                "class_order": ("seeded", "natural")}
_NORMALIZE = {"none": (None, None), "cifar": (CIFAR_MEAN, CIFAR_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
              "half": (HALF, HALF)}


def data_kwargs(data: dict) -> dict:
    """The benchmark keyword arguments of a config's ``data`` section (:data:`DATA_DEFAULTS`): only the
    settings that differ from their defaults, as factory arguments (``image_size``, ``mean``/``std``,
    ``augment``, ``class_order``, ``per_class``).

    Raises:
      ValueError: an unknown key or value, naming ``data.<key>`` and the valid ones.
    """
    out = {}
    for k, v in (data or {}).items():
        if k not in DATA_DEFAULTS:
            raise ValueError(f"unknown setting data.{k}; valid: {', '.join(DATA_DEFAULTS)}")
        if k in DATA_CHOICES and v not in DATA_CHOICES[k]:
            raise ValueError(f"data.{k}={v!r} is not valid; valid: {', '.join(DATA_CHOICES[k])}")
        if k in ("image_size", "per_class", "crop_pad") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"data.{k} must be an integer >= 0 (0: the default), got {v!r}")
        if v == DATA_DEFAULTS[k]:
            continue
        if k == "normalize":
            out["mean"], out["std"] = _NORMALIZE[v]
        elif k == "augment":
            out["augment"] = v == "on"
        elif k == "crop_pad":
            if (data or {}).get("augment") == "off":
                raise ValueError(f"data.crop_pad={v} pads the training augmentation, which data.augment=off "
                                 "turns off; leave one of them at its default")
            out["augment"] = v  # an int: the augmentation on, padding by v pixels (make_preprocess)
        else:
            out[k] = v
    return out


def benchmark_kwargs(factory: Callable, cfg: dict, name: str = "") -> dict:
    """The keyword arguments of ``cfg`` (``data_dir``, per-backbone preprocessing, the ``data`` section)
    that ``factory`` takes.

    Raises:
      ValueError: a ``data`` setting away from its default that the benchmark ``name`` does not take,
        naming the setting and the ones it takes.
    """
    import inspect

    bb = dict(cfg.get("backbone", {}))
    bname = bb.pop("name", "")
    kw = dict(preprocessing_for(bname, bb))
    if cfg.get("data_dir"):
        kw["data_dir"] = cfg["data_dir"]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    data = data_kwargs(cfg.get("data", {}))
    for k in data:
        if not takes_any and k not in params:
            setting = {"mean": "normalize", "std": "normalize"}.get(k, k)
            if k == "augment" and (cfg.get("data") or {}).get("crop_pad"):
                setting = "crop_pad"
            valid = [d for d, arg in (("image_size", "image_size"), ("normalize", "mean"), ("augment", "augment"),
                                      ("class_order", "class_order"), ("per_class", "per_class")) if arg in params]
            raise ValueError(f"data.{setting} is not a setting of benchmark {name or factory.__name__!r}"
                             f" (its data settings: {', '.join(valid) or 'none'})")
    kw.update(data)
    if takes_any:
        return kw
    return {k: v for k, v in kw.items() if k in params}
