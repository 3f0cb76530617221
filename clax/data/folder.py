"""Benchmarks from image folders on disk.

* :func:`image_folder`: any data set laid out as ``<root>/<split>/<class>/<image>`` (torchvision's
  ImageFolder layout, Kaggle releases, ../shared/data/cifar10-images) split into tasks by class; the
  class names are the folder names, sorted (global id = position in that sorted list).
* :func:`split_tinyimagenet`: the standard ``tiny-imagenet-200`` release: ``wnids.txt``,
  ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
  (the test split has no labels, so ``val`` is the test set). Class names are the WordNet ids, or
  their words where ``words.txt`` is present.
* :func:`split_tinyimagenet32` (``split-tinyimagenet32``, 10 tasks of 20 classes) and
  :func:`split_tinyimagenet32_20` (``split-tinyimagenet32-20``, 20 of 10): the same layout with every
  image downsampled to 32x32 (../shared/data/tiny-imagenet-200-32px.tar.gz). Figures measured on it are
  to be labelled "Tiny-ImageNet 32x32": it is not the 64x64 benchmark that papers report on.

Every factory takes ``class_order`` (``"seeded"``: a permutation drawn from the seed; ``"natural"``: the
sorted class names' order) and ``per_class`` (at most this many training images of each class, a seeded
subsample; 0: all), the config's ``data.class_order`` and ``data.per_class``.

Images are read lazily (:class:`~clax.data.pipeline.ImageSource`): only file names and labels are
held in memory.
"""
from __future__ import annotations

import os

import numpy as np

from clax.data.pipeline import ImageSource, make_preprocess, split_by_class, class_order, CIFAR_MEAN, CIFAR_STD
from clax.data.stream import Benchmark

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff")


def read_image(path: str) -> np.ndarray:
    """The image at ``path`` decoded into a uint8 RGB array ``[H, W, 3]``.

    Raises:
      ValueError: the file cannot be read or decoded (corrupt, truncated, not an image), naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, ...
        why = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot read image {path}: {why}; remove or replace the file") from None


class FileReader:
    """``reader(indices)``: decodes ``paths[i]`` for each index into a uint8 RGB array (a file that
    cannot be decoded is a ValueError naming it, see :func:`read_image`).

    With ``cache=True`` every decoded image is kept in memory and never decoded again (the same
    pixels: decoding is deterministic); for small images read many times, such as a 32x32 test set
    evaluated after every task (3 KB an image).
    """

    def __init__(self, paths, cache: bool = False):
        self.paths = list(paths)
        self._cache: dict | None = {} if cache else None

    def __call__(self, indices):
        if self._cache is None:
            return [read_image(self.paths[i]) for i in indices]
        out = []
        for i in indices:
            img = self._cache.get(i)
            if img is None:
                img = self._cache[i] = read_image(self.paths[i])
            out.append(img)
        return out


def _images_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{what}: {path} is not a directory")


def scan_split(root: str, split: str, classes: list[str] | None = None):
    """``(paths, labels, class_names)`` of ``<root>/<split>/<class>/<image>``.

    ``classes`` fixes the class list (the test split must use the train split's); otherwise it is the
    sorted list of sub-folders. Raises ValueError naming what was expected where.
    """
    expected = f"expected the layout {root}/{split}/<class>/<image> (e.g. {root}/{split}/cat/0001.jpg)"
    base = os.path.join(root, split)
    if not os.path.isdir(root):
        raise ValueError(f"data dir {root} does not exist; {expected}")
    if not os.path.isdir(base):
        found = sorted(os.listdir(root))[:10]
        raise ValueError(f"no {split}/ folder in {root} (found {found}); {expected}")
    subdirs = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if not subdirs:
        raise ValueError(f"{base} has no class folders; {expected}")
    if classes is None:
        classes = subdirs
    else:
        missing = sorted(set(classes) - set(subdirs))
        extra = sorted(set(subdirs) - set(classes))
        if missing or extra:
            raise ValueError(f"{base}: class folders differ from the train split's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]}); {expected}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = _images_in(os.path.join(base, name))
        if not files:
            raise ValueError(f"{os.path.join(base, name)} holds no images ({', '.join(IMAGE_EXTENSIONS)}); {expected}")
        paths += files
        labels += [c] * len(files)
    return paths, np.asarray(labels, np.int64), list(classes)


def _native_size(path: str) -> int:
    return int(max(read_image(path).shape[:2]))


def _subsample(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``per_class`` images of each class (all when ``None``), sorted."""
    if not per_class:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def mixed_order(n: int) -> np.ndarray:
    """A fixed permutation of ``n`` rows (the same for every seed and run), which puts a folder's test
    images, read class folder by class folder, into an order that mixes the classes, as CIFAR's and
    Tiny-ImageNet's own test files are. Evaluation batches then hold several classes: with test-time
    batch statistics (``pah.bn=batch``, ``ibm.bn=batch``, ``wsn.bn=batch``, the authors' choice) a batch of
    one class normalises its class away and predicts at chance. Running statistics give the same
    accuracy in any order."""
    return np.random.default_rng(0x6D6978).permutation(n)


def _check_per_class(name: str, per_class) -> None:
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer))
                                  or per_class < 0):
        raise ValueError(f"{name}: per_class must be an integer >= 0 (0: every training image), got {per_class!r}")


def _benchmark(name, train, test, classes, seed, view, num_tasks, image_size, mean, std, augment,
               train_per_class, test_per_class, workers, order="seeded", cache=False):
    (ptr, ytr), (pte, yte) = train, test
    _check_per_class(name, train_per_class)
    ktr, kte = _subsample(ytr, train_per_class, seed), _subsample(yte, test_per_class, seed + 1)
    ptr, ytr = [ptr[i] for i in ktr], ytr[ktr]
    kte = kte[mixed_order(len(kte))]  # test rows in a fixed order that mixes the classes (see mixed_order)
    pte, yte = [pte[i] for i in kte], yte[kte]
    native = _native_size(ptr[0])
    pre_tr, pre_te = make_preprocess(view, native, 3, image_size, mean, std, augment)
    src_tr = ImageSource([(FileReader(ptr, cache), np.arange(len(ptr)))], pre_tr, augment=augment, seed=seed,
                         workers=workers)
    src_te = ImageSource([(FileReader(pte, cache), np.arange(len(pte)))], pre_te, workers=workers)
    order = class_order(len(classes), num_tasks, seed, name, order)
    return split_by_class(name, src_tr, ytr, src_te, yte, order, classes, len(classes))


def image_folder(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 5,
                 train_split: str = "train", test_split: str = "test", image_size: int | None = None,
                 mean=CIFAR_MEAN, std=CIFAR_STD, augment: bool = True, train_per_class: int | None = None,
                 test_per_class: int | None = None, workers: int = 2, name: str = "image-folder",
                 class_order: str = "seeded", per_class: int = 0) -> Benchmark:
    """Any <split>/<class>/<image> folder, split into ``num_tasks`` tasks by class.

    Args:
      data_dir: the folder holding ``train_split/`` and ``test_split/``.
      image_size: resize to this size (default: the first training image's size).
      mean, std: normalisation; ``augment``: random crop + flip on training images.
      train_per_class, test_per_class: keep at most this many images per class (seeded subsample).
      class_order: ``"seeded"`` (a permutation of the classes drawn from ``seed``) or ``"natural"``
        (the sorted folder names' order).
      per_class: the config's ``data.per_class``: ``train_per_class`` where it is > 0.
    """
    if not data_dir:
        raise ValueError(f"{name} needs data_dir (--data-dir) pointing at a folder with "
                         f"{train_split}/<class>/<image> and {test_split}/<class>/<image>")
    ptr, ytr, classes = scan_split(data_dir, train_split)
    pte, yte, _ = scan_split(data_dir, test_split, classes)
    _check_per_class(name, per_class)
    return _benchmark(name, (ptr, ytr), (pte, yte), classes, seed, view, num_tasks, image_size, mean, std,
                      augment, per_class or train_per_class, test_per_class, workers, class_order)


def split_cifar10_folder(seed: int = 0, view: str = "image", data_dir: str | None = None, **kwargs) -> Benchmark:
    """Split-CIFAR-10 from a class-folder copy (5 tasks x 2 classes); see :func:`image_folder`."""
    bench = image_folder(seed, view, data_dir, **{"num_tasks": 5, **kwargs, "name": "split-cifar10"})
    if bench.num_classes != 10:
        raise ValueError(f"split-cifar10: {data_dir}/train has {bench.num_classes} class folders; expected 10")
    return bench


TINY_MEAN, TINY_STD = (0.480, 0.448, 0.398), (0.277, 0.269, 0.282)


def scan_tinyimagenet(data_dir: str | None, name: str = "split-tinyimagenet"):
    """``(train (paths, labels), test (paths, labels), class names)`` of a ``tiny-imagenet-200`` folder.

    Reads ``train/<wnid>/images/*`` and ``val/images/*`` with ``val/val_annotations.txt``
    (``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``). ``data_dir`` may be the ``tiny-imagenet-200``
    folder itself or its parent. Class ids follow the sorted WordNet ids; names are their words where
    ``words.txt`` is present.

    Raises:
      ValueError: no ``data_dir``, or a missing or malformed part, naming the expected layout.
    """
    if not data_dir:
        raise ValueError(f"{name} needs data_dir (--data-dir) pointing at tiny-imagenet-200/ (the layout "
                         f"wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt)")
    root = data_dir
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "tiny-imagenet-200")):
        root = os.path.join(root, "tiny-imagenet-200")
    expected = (f"expected the tiny-imagenet-200 layout: {root}/train/<wnid>/images/*.JPEG, "
                f"{root}/val/images/*.JPEG and {root}/val/val_annotations.txt")
    if not os.path.isdir(root):
        raise ValueError(f"data dir {root} does not exist; {expected}")
    train_dir, ann = os.path.join(root, "train"), os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isdir(train_dir):
        raise ValueError(f"no train/ folder in {root} (found {sorted(os.listdir(root))[:10]}); {expected}")
    if not os.path.isfile(ann):
        raise ValueError(f"{ann} is missing; {expected}")
    wnids_file = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_file):
        wnids = sorted(w.strip() for w in open(wnids_file) if w.strip())
    else:
        wnids = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not wnids:
        raise ValueError(f"{train_dir} has no class folders; {expected}")
    lookup = {w: i for i, w in enumerate(wnids)}
    ptr, ytr = [], []
    for w in wnids:
        d = os.path.join(train_dir, w, "images")
        if not os.path.isdir(d):
            raise ValueError(f"{d} is missing; {expected}")
        files = _images_in(d)
        if not files:
            raise ValueError(f"{d} holds no images; {expected}")
        ptr += files
        ytr += [lookup[w]] * len(files)
    pte, yte = [], []
    for n, line in enumerate(open(ann)):
        parts = line.strip().split("\t")
        if not line.strip():
            continue
        if len(parts) < 2 or parts[1] not in lookup:
            raise ValueError(f"{ann}, line {n + 1}: expected 'file<TAB>wnid<TAB>...' with a wnid of "
                             f"train/, got {line.strip()!r}")
        path = os.path.join(root, "val", "images", parts[0])
        if not os.path.isfile(path):
            raise ValueError(f"{ann}, line {n + 1}: {path} does not exist; {expected}")
        pte.append(path)
        yte.append(lookup[parts[1]])
    names = list(wnids)
    words = os.path.join(root, "words.txt")
    if os.path.isfile(words):
        table = dict(line.rstrip("\n").split("\t", 1) for line in open(words) if "\t" in line)
        names = [table.get(w, w) for w in wnids]
    return (ptr, np.asarray(ytr, np.int64)), (pte, np.asarray(yte, np.int64)), names


def split_tinyimagenet(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 10,
                       image_size: int | None = None, mean=TINY_MEAN, std=TINY_STD, augment: bool = True,
                       train_per_class: int | None = None, test_per_class: int | None = None,
                       workers: int = 2, class_order: str = "seeded", per_class: int = 0) -> Benchmark:
    """Split-TinyImageNet: 200 classes (64 x 64) in 10 or 20 tasks, from the tiny-imagenet-200 folder.

    Reads ``train/<wnid>/images/*`` and ``val/images/*`` with ``val/val_annotations.txt``
    (``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``). ``data_dir`` may be the ``tiny-imagenet-200``
    folder itself or its parent. ``class_order``: ``"seeded"`` (drawn from ``seed``) or ``"natural"``
    (sorted WordNet ids); ``per_class`` (> 0): at most this many training images per class.
    """
    train, test, names = scan_tinyimagenet(data_dir, "split-tinyimagenet")
    _check_per_class("split-tinyimagenet", per_class)
    return _benchmark("split-tinyimagenet", train, test, names, seed, view, num_tasks, image_size, mean, std,
                      augment, per_class or train_per_class, test_per_class, workers, class_order)


def split_tinyimagenet_20(seed: int = 0, view: str = "image", **kwargs) -> Benchmark:
    """Split-TinyImageNet in 20 tasks of 10 classes, from the tiny-imagenet-200 folder."""
    return split_tinyimagenet(seed, view, **{"num_tasks": 20, **kwargs})


#: the native image size of ``split-tinyimagenet32``'s folder
TINY32_SIZE = 32


def split_tinyimagenet32(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 10,
                         image_size: int | None = None, mean=TINY_MEAN, std=TINY_STD, augment: bool = True,
                         class_order: str = "seeded", per_class: int = 0, test_per_class: int | None = None,
                         workers: int = 2, name: str = "split-tinyimagenet32") -> Benchmark:
    """Tiny-ImageNet 32x32: 200 classes in 10 tasks of 20 (``split-tinyimagenet32``), from a
    tiny-imagenet-200 folder whose images were downsampled to 32x32 (../shared/data/
    tiny-imagenet-200-32px.tar.gz). Label figures measured on it "Tiny-ImageNet 32x32": it is not the
    64x64 benchmark that papers report on.

    The layout is the release's (see :func:`scan_tinyimagenet`; ``val/`` is the test set). Inputs are
    32x32 (``image_size`` resizes, e.g. 224 for an ImageNet-stem protocol), normalised with the
    Tiny-ImageNet statistics, and training images get the CIFAR-style augmentation (4-pixel zero padding,
    random 32x32 crop, horizontal flip) unless ``augment=False``. Decoded images are kept in memory
    (:class:`FileReader` ``cache``; 3 KB an image, about 330 MB with every image of both splits), so
    that the test set, evaluated after every task, is decoded once.

    Args:
      class_order: ``"seeded"`` (a permutation of the 200 classes drawn from ``seed``) or ``"natural"``
        (sorted WordNet ids: classes 0-19 are task 0, ...).
      per_class: at most this many training images of each class (a seeded subsample; 0: all 500).
      test_per_class: at most this many test (val) images of each class (default: all 50).

    Raises:
      ValueError: a missing or malformed folder, naming the expected layout; images that are not 32x32,
        naming the size found.
    """
    train, test, names = scan_tinyimagenet(data_dir, name)
    for what, paths in (("training", train[0]), ("val", test[0])):
        h, w = read_image(paths[0]).shape[:2]
        if (h, w) != (TINY32_SIZE, TINY32_SIZE):
            raise ValueError(
                f"{name} expects the 32x32 re-encode of tiny-imagenet-200, but the {what} image {paths[0]} is "
                f"{w}x{h}; use the 32px folder (../shared/data/tiny-imagenet-200-32px.tar.gz, same layout: "
                f"train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt), or "
                f"split-tinyimagenet for the 64x64 release")
    _check_per_class(name, per_class)
    return _benchmark(name, train, test, names, seed, view, num_tasks, image_size, mean, std, augment,
                      per_class, test_per_class, workers, class_order, cache=True)


def split_tinyimagenet32_20(seed: int = 0, view: str = "image", **kwargs) -> Benchmark:
    """Tiny-ImageNet 32x32 in 20 tasks of 10 classes (``split-tinyimagenet32-20``); see
    :func:`split_tinyimagenet32`."""
    return split_tinyimagenet32(seed, view, **{"num_tasks": 20, "name": "split-tinyimagenet32-20", **kwargs})
