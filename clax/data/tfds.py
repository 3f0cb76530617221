"""Benchmarks from TensorFlow Datasets, read through ``tfds.data_source`` (random access to array_record
files: TensorFlow is not needed at run time).

==================  =========================================  ==========================================
name                TFDS data set(s)                           tasks
==================  =========================================  ==========================================
split-cifar100      cifar100                                   10 x 10 classes (``num_tasks=20``: 20 x 5)
split-cifar10       cifar10, or a class folder (``data_dir``)  5 x 2
imagenet-r          imagenet_r (test split, seeded 80/20)       10 x 20 classes, resized to 224
cub200              caltech_birds2011                          10 x 20 (``num_tasks=5``: 5 x 40), 224
5-datasets          cifar10, mnist, svhn_cropped,               5 x 10 (one data set per task), 32 x 32 x 3
                    fashion_mnist, emnist/letters A-J
split-mnist         mnist                                      5 x 2
permuted-mnist      mnist                                      10 tasks of all 10 digits, pixels permuted
cifar10-cifar100    cifar10, then cifar100                     11 tasks: CIFAR-10 (10 classes), then
                                                               10 x 10 CIFAR-100 classes (hembed's stream)
==================  =========================================  ==========================================

notMNIST (letters A-J in many fonts) is not in TFDS; 5-datasets uses EMNIST's handwritten letters A-J
in its place (the same ten letters and 28 x 28 grey images; handwritten instead of typeset).

The data must be prepared in the array_record format under ``data_dir`` (default ``~/tensorflow_datasets``).
Preparing runs the TFDS builder, which needs TensorFlow: ``pip install 'clax[tfds-prepare]'`` then
``tfds build cifar100 --file_format=array_record --data_dir=DIR`` (or pass ``download=True``).
Every factory takes the config's ``data`` settings (:data:`clax.data.pipeline.DATA_DEFAULTS`):
``class_order`` (``"seeded"``, the default: a permutation of the classes drawn from the seed;
``"natural"``: the data set's label order 0, 1, ...) and ``per_class`` (at most this many training
images of each class, a seeded subsample; 0: all), beside ``image_size``, ``mean``/``std`` and
``augment`` where the images are the data set's own. 5-datasets keeps the order of the table either
way (a task is a whole data set) and permuted-MNIST has all ten digits in every task, so
``class_order`` changes neither.
"""
from __future__ import annotations

import os

import numpy as np

from clax.data.pipeline import (CIFAR_MEAN, CIFAR_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, ImageSource,
                                class_order, make_preprocess, split_by_class)
from clax.data.pipeline import class_order as _class_order  # the factories' argument of that name shadows it
from clax.data.stream import Benchmark, Task

PREPARE_HINT = ("prepare it with TensorFlow installed (pip install 'clax[tfds-prepare]'): "
                "tfds build {name} --file_format=array_record --data_dir={dir}")


def _open(name: str, split: str, data_dir: str | None, download: bool, **kw):
    import tensorflow_datasets as tfds

    if data_dir and not os.path.isdir(data_dir):
        raise ValueError(f"data dir {data_dir} does not exist; expected a TFDS data dir holding "
                         f"{data_dir}/{name.split('/')[0]}/<version>/*.array_record-*")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download, **kw)
    except Exception as e:  # not prepared, prepared as tfrecord, or a builder that needs TensorFlow
        where = data_dir or os.path.expanduser("~/tensorflow_datasets")
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ValueError(f"TFDS data set {name!r} (split {split!r}) is not available as array_record in "
                         f"{where} ({type(e).__name__}: {first}); "
                         + PREPARE_HINT.format(name=name, dir=where)) from None


class TfdsReader:
    """``reader(indices)``: the ``image`` feature of records ``indices`` of a TFDS data source.

    The data source is opened on first use in each process (it holds file handles).
    """

    def __init__(self, name: str, split: str, data_dir: str | None, download: bool = False,
                 transpose: bool = False):
        self.name, self.split, self.data_dir, self.download, self.transpose = name, split, data_dir, download, transpose
        self._ds = None

    @property
    def ds(self):
        """The TFDS data source, opened at the first use."""
        if self._ds is None:
            self._ds = _open(self.name, self.split, self.data_dir, self.download)
        return self._ds

    def __len__(self) -> int:
        return len(self.ds)

    def labels(self) -> np.ndarray:
        """All labels ``[N]`` (this decodes every record once: TFDS skips image decoding only with TensorFlow)."""
        ds = self.ds
        return np.asarray([int(ds[i]["label"]) for i in range(len(ds))], np.int64)

    def __call__(self, indices):
        ds = self.ds
        imgs = [np.asarray(ds[int(i)]["image"]) for i in indices]
        return [np.swapaxes(i, 0, 1) for i in imgs] if self.transpose else imgs


def _check_data(bench: str, order: str, per_class) -> None:
    """Refuses a ``class_order`` or ``per_class`` that is not valid, naming the benchmark and the valid values."""
    if order not in ("seeded", "natural"):
        raise ValueError(f"{bench}: class_order={order!r} is not valid; valid: seeded, natural")
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 0:
        raise ValueError(f"{bench}: per_class must be an integer >= 0 (0: every training image), got {per_class!r}")


def per_class_subsample(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``per_class`` rows of each label of ``y`` (a seeded draw; every row
    where ``per_class`` is 0)."""
    y = np.asarray(y)
    if not per_class:
        return np.arange(len(y))
    rng = np.random.default_rng([seed, 7])  # its own stream: the class order's draw is unchanged
    keep = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _class_split(bench: str, tfds_name: str, seed, view, data_dir, num_tasks, image_size, native, channels, mean,
                 std, augment, download, train_split="train", test_split="test", label_map=None, held_out=None,
                 order: str = "seeded", per_class: int = 0):
    _check_data(bench, order, per_class)
    rtr, rte = TfdsReader(tfds_name, train_split, data_dir, download), TfdsReader(tfds_name, test_split, data_dir, download)
    ytr = rtr.labels()
    if held_out is not None:  # one split only: a seeded, per-class held-out fraction becomes the test set
        rte, idx_tr, idx_te = rtr, *_holdout(ytr, held_out, seed)
        yte = ytr[idx_te]
        ytr = ytr[idx_tr]
    else:
        yte = rte.labels()
        idx_tr, idx_te = np.arange(len(ytr)), np.arange(len(yte))
    if label_map is not None:
        ytr, yte = label_map(ytr), label_map(yte)
    classes = np.unique(np.concatenate([ytr, yte]))
    num_classes = int(classes.size)
    if not np.array_equal(classes, np.arange(num_classes)):  # e.g. imagenet-r: 200 of ImageNet's 1000 ids
        remap = {int(c): i for i, c in enumerate(classes)}
        ytr = np.asarray([remap[int(v)] for v in ytr])
        yte = np.asarray([remap[int(v)] for v in yte])
    if per_class:
        keep = per_class_subsample(ytr, per_class, seed)
        idx_tr, ytr = idx_tr[keep], ytr[keep]
    pre_tr, pre_te = make_preprocess(view, native, channels, image_size, mean, std, augment)
    src_tr = ImageSource([(rtr, idx_tr)], pre_tr, augment=augment, seed=seed)
    src_te = ImageSource([(rte, idx_te)], pre_te)
    order = class_order(num_classes, num_tasks, seed, bench, order)
    names = None
    try:
        import tensorflow_datasets as tfds

        feat = tfds.builder(tfds_name, data_dir=data_dir).info.features["label"]
        names = [feat.int2str(int(c)) for c in classes]
    except Exception:  # names are a convenience; a builder without them is fine
        names = [str(int(c)) for c in classes]
    return split_by_class(bench, src_tr, ytr, src_te, yte, order, names, num_classes)


def _holdout(y: np.ndarray, fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        te.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def split_cifar100(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 10,
                   image_size: int | None = None, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                   augment: bool = True, download: bool = False, class_order: str = "seeded",
                   per_class: int = 0) -> Benchmark:
    """Split-CIFAR-100: 10 tasks of 10 classes (or 20 of 5), TFDS cifar100."""
    return _class_split("split-cifar100", "cifar100", seed, view, data_dir, num_tasks, image_size, 32, 3, mean, std,
                        augment, download, order=class_order, per_class=per_class)


def split_cifar10(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 5,
                  image_size: int | None = None, mean=CIFAR_MEAN, std=CIFAR_STD, augment: bool = True,
                  download: bool = False, class_order: str = "seeded", per_class: int = 0,
                  **folder_kwargs) -> Benchmark:
    """Split-CIFAR-10: 5 tasks of 2 classes, from TFDS cifar10 or a train/<class>/<image> folder."""
    _check_data("split-cifar10", class_order, per_class)
    if data_dir and os.path.isdir(os.path.join(data_dir, "train")):
        from clax.data.folder import split_cifar10_folder

        # the data settings reach the folder reader only where they are set (its own defaults otherwise)
        data = {k: v for k, v in (("class_order", class_order), ("per_class", per_class))
                if v != {"class_order": "seeded", "per_class": 0}[k]}
        return split_cifar10_folder(seed, view, data_dir, num_tasks=num_tasks, image_size=image_size, mean=mean,
                                    std=std, augment=augment, **data, **folder_kwargs)
    if folder_kwargs:
        raise ValueError(f"split-cifar10: {sorted(folder_kwargs)[0]!r} applies only to a class-folder data_dir")
    return _class_split("split-cifar10", "cifar10", seed, view, data_dir, num_tasks, image_size, 32, 3, mean, std,
                        augment, download, order=class_order, per_class=per_class)


def imagenet_r(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 10,
               image_size: int | None = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: bool = False,
               download: bool = False, test_fraction: float = 0.2, class_order: str = "seeded",
               per_class: int = 0) -> Benchmark:
    """ImageNet-R: 200 classes in 10 tasks; TFDS has one split, so 20% of each class (seeded) is the test set
    (``per_class`` subsamples the remaining training images)."""
    return _class_split("imagenet-r", "imagenet_r", seed, view, data_dir, num_tasks, image_size, 224, 3, mean, std,
                        augment, download, train_split="test", held_out=test_fraction, order=class_order,
                        per_class=per_class)


def cub200(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 10,
           image_size: int | None = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: bool = False,
           download: bool = False, class_order: str = "seeded", per_class: int = 0) -> Benchmark:
    """CUB-200-2011: 200 bird species in 10 (or 5) tasks, TFDS caltech_birds2011."""
    return _class_split("cub200", "caltech_birds2011", seed, view, data_dir, num_tasks, image_size, 224, 3, mean,
                        std, augment, download, order=class_order, per_class=per_class)


def _mnist_pre(view, image_size):
    # flat: 28 x 28 grey vectors (MLP); image: 32 x 32 RGB so that CIFAR-style backbones run unchanged.
    return (28, 1) if view == "flat" else (image_size or 32, 3)


def split_mnist(seed: int = 0, view: str = "flat", data_dir: str | None = None, num_tasks: int = 5,
                image_size: int | None = None, download: bool = False, class_order: str = "seeded",
                per_class: int = 0) -> Benchmark:
    """Split-MNIST: 5 tasks of 2 digits ([784] vectors, or 32 x 32 x 3 images)."""
    size, ch = _mnist_pre(view, image_size)
    return _class_split("split-mnist", "mnist", seed, view, data_dir, num_tasks, size, 28, ch, None, None, False,
                        download, order=class_order, per_class=per_class)


def permuted_mnist(seed: int = 0, view: str = "flat", data_dir: str | None = None, num_tasks: int = 10,
                   image_size: int | None = None, download: bool = False, class_order: str = "seeded",
                   per_class: int = 0) -> Benchmark:
    """Permuted-MNIST: every task has the 10 digits; task 0 the original pixels, task t > 0 a seeded permutation
    (``class_order`` changes nothing: every task has every digit; ``per_class`` subsamples the training images,
    the same ones in every task)."""
    _check_data("permuted-mnist", class_order, per_class)
    size, ch = _mnist_pre(view, image_size)
    rtr, rte = TfdsReader("mnist", "train", data_dir, download), TfdsReader("mnist", "test", data_dir, download)
    ytr, yte = rtr.labels(), rte.labels()
    itr = per_class_subsample(ytr, per_class, seed)
    ytr = ytr[itr]
    rng = np.random.default_rng(seed + 1)
    tasks = []
    for t in range(num_tasks):
        perm = None if t == 0 else rng.permutation(size * size)
        pre_tr, pre_te = make_preprocess(view, 28, ch, size, None, None, False, perm)
        tasks.append(Task(t, tuple(range(10)), ImageSource([(rtr, itr)], pre_tr),
                          ytr, ImageSource([(rte, np.arange(len(yte)))], pre_te), yte))
    return Benchmark("permuted-mnist", tuple(tasks), 10, tuple(tasks[0].x_train.shape[1:]),
                     tuple(str(i) for i in range(10)))


#: 5-datasets: (TFDS name, label map to 0..9, transpose) in task order.
FIVE_DATASETS = (
    ("cifar10", None, False),
    ("mnist", None, False),
    ("svhn_cropped", None, False),
    ("fashion_mnist", None, False),
    ("emnist/letters", "letters_a_to_j", True),  # stands in for notMNIST (not in TFDS)
)


def five_datasets(seed: int = 0, view: str = "image", data_dir: str | None = None, image_size: int | None = 32,
                  download: bool = False, mean=HALF, std=HALF, augment: bool = False, class_order: str = "seeded",
                  per_class: int = 0) -> Benchmark:
    """5-datasets: CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST (EMNIST letters A-J stand in), one per task.

    Every image becomes ``image_size`` x ``image_size`` x 3 (32 by default; grey repeated), normalised with
    ``mean``/``std`` (default [-1, 1]); global label ``10 t + c``. ``augment``: the CIFAR-style crop and flip
    on training images (off by default). The tasks keep the table's order whatever ``class_order`` says (a
    task is a whole data set); ``per_class`` subsamples each data set's training images.
    """
    _check_data("5-datasets", class_order, per_class)
    size = image_size or 32
    pre_tr, pre_te = make_preprocess(view, size, 3, size, mean, std, augment)
    tasks, names = [], []
    for t, (name, lmap, transpose) in enumerate(FIVE_DATASETS):
        rtr = TfdsReader(name, "train", data_dir, download, transpose)
        rte = TfdsReader(name, "test", data_dir, download, transpose)
        ytr, yte = rtr.labels(), rte.labels()
        itr, ite = np.arange(len(ytr)), np.arange(len(yte))
        if lmap == "letters_a_to_j":  # EMNIST letters: 1..26 = a..z; keep a..j as 0..9
            itr, ite = itr[(ytr >= 1) & (ytr <= 10)], ite[(yte >= 1) & (yte <= 10)]
            ytr, yte = ytr[itr] - 1, yte[ite] - 1
            labels = list("ABCDEFGHIJ")
        else:
            labels = [str(c) for c in range(10)]
        keep = per_class_subsample(ytr, per_class, seed + t)
        itr, ytr = itr[keep], ytr[keep]
        names += [f"{name}:{c}" for c in labels]
        cs = tuple(range(10 * t, 10 * t + 10))
        tasks.append(Task(t, cs, ImageSource([(rtr, itr)], pre_tr, augment=augment, seed=seed), ytr + 10 * t,
                          ImageSource([(rte, ite)], pre_te), yte + 10 * t))
    return Benchmark("5-datasets", tuple(tasks), 50, pre_tr.shape, tuple(names))


def split_cifar100_20(seed: int = 0, view: str = "image", **kwargs) -> Benchmark:
    """Split-CIFAR-100 in 20 tasks of 5 classes, TFDS cifar100."""
    return split_cifar100(seed, view, **{"num_tasks": 20, **kwargs})


def cub200_5(seed: int = 0, view: str = "image", **kwargs) -> Benchmark:
    """CUB-200-2011 in 5 tasks of 40 species, TFDS caltech_birds2011."""
    return cub200(seed, view, **{"num_tasks": 5, **kwargs})


def _label_names(tfds_name: str, data_dir, n: int) -> list[str]:
    try:
        import tensorflow_datasets as tfds

        feat = tfds.builder(tfds_name, data_dir=data_dir).info.features["label"]
        return [feat.int2str(c) for c in range(n)]
    except Exception:  # names are a convenience; a builder without them is fine
        return [str(c) for c in range(n)]


def cifar10_cifar100(seed: int = 0, view: str = "image", data_dir: str | None = None, num_tasks: int = 11,
                     image_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: bool = True,
                     download: bool = False, class_order: str = "seeded", per_class: int = 0) -> Benchmark:
    """CIFAR-10 then CIFAR-100 in splits of 10 classes: the 11-task stream of the H-embedding paper (Wu et al.,
    arXiv 2502.11609) and of von Oswald et al.'s HNET, TFDS cifar10 and cifar100.

    Task 0 is the whole of CIFAR-10 (global labels 0-9); tasks 1..``num_tasks - 1`` hold 10 CIFAR-100
    classes each (global label ``10 + c`` for CIFAR-100 class ``c``; 110 classes in all). TIL: each task
    is a 10-way problem. ``class_order="natural"`` is the authors' stream (viki760/H-embedding_guided_
    hypernet-for-review- ``data/special/split_cifar.py:get_split_cifar_handlers``: task ``i >= 1`` holds
    CIFAR-100 labels ``10 (i - 1) .. 10 i - 1``; the config ``experiments/hembed_cifar.py`` sets it);
    ``"seeded"`` (the default, as every benchmark's) deals the 100 CIFAR-100 classes out by a permutation
    drawn from the seed. CIFAR-10 is task 0 either way. With ``num_tasks < 11`` only the first
    ``num_tasks - 1`` splits are used (as the authors' ``--num_tasks``).

    Defaults follow the authors' loader (``data/cifar10_data.py:torch_input_transforms``, used for both
    parts): ImageNet mean and std for CIFAR-10 and CIFAR-100 alike, and for training images a random
    horizontal flip and a random 32x32 crop of the image zero-padded by 4; no validation split.
    ``per_class``: at most this many training images of each class (seeded; 0: all).
    """
    name = "cifar10-cifar100"
    _check_data(name, class_order, per_class)
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or not 1 <= num_tasks <= 11:
        raise ValueError(f"{name}: num_tasks must be an integer from 1 to 11 (CIFAR-10, then up to 10 CIFAR-100 "
                         f"splits), got {num_tasks!r}")
    readers = {(d, split): TfdsReader(d, split, data_dir, download) for d in ("cifar10", "cifar100")
               for split in ("train", "test")}
    offset = {"cifar10": 0, "cifar100": 10}
    segs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    for d in ("cifar10", "cifar100"):
        for split in ("train", "test"):
            y = readers[d, split].labels()
            idx = np.arange(len(y))
            if split == "train" and per_class:
                idx = per_class_subsample(y, per_class, seed + offset[d])
            segs[split].append((readers[d, split], idx))
            ys[split].append(y[idx] + offset[d])
    pre_tr, pre_te = make_preprocess(view, 32, 3, image_size, mean, std, augment)
    src_tr = ImageSource(segs["train"], pre_tr, augment=augment, seed=seed)
    src_te = ImageSource(segs["test"], pre_te)
    splits = _class_order(100, 10, seed, name, class_order)[: num_tasks - 1]
    order = [list(range(10))] + [[10 + c for c in cs] for cs in splits]
    names = ([f"cifar10:{n}" for n in _label_names("cifar10", data_dir, 10)]
             + [f"cifar100:{n}" for n in _label_names("cifar100", data_dir, 100)])
    return split_by_class(name, src_tr, np.concatenate(ys["train"]), src_te, np.concatenate(ys["test"]), order,
                          names, 110)
