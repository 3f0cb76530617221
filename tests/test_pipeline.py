"""The streaming input pipeline: lazy sources, augmentation, per-backbone preprocessing, prefetching."""
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clax.data.folder import image_folder
from clax.data.pipeline import HALF, CLIP_MEAN, ImageSource, Preprocess, prefetch, preprocessing_for


class ArrayReader:
    """A reader over an in-memory uint8 array (stands in for files)."""

    def __init__(self, images):
        self.images, self.calls = images, 0

    def __call__(self, indices):
        self.calls += 1
        return [self.images[i] for i in indices]


IMGS = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)


def source(augment=False, seed=0, **pre):
    return ImageSource([(ArrayReader(IMGS), np.arange(20))], Preprocess(**{"size": 8, **pre}), augment, seed)


def test_source_is_lazy_and_indexes_like_an_array():
    src = source()
    reader = src.segments[0][0]
    assert src.shape == (20, 8, 8, 3) and src.ndim == 4 and len(src) == 20 and reader.calls == 0
    np.testing.assert_allclose(src[[3, 1]], IMGS[[3, 1]] / 255.0, atol=1e-7)
    np.testing.assert_allclose(src[2:5], IMGS[2:5] / 255.0, atol=1e-7)
    np.testing.assert_allclose(src[-1], IMGS[-1] / 255.0, atol=1e-7)
    sub = src.take([4, 7, 9])
    np.testing.assert_allclose(sub[:], IMGS[[4, 7, 9]] / 255.0, atol=1e-7)
    both = np.concatenate([sub, src.take([0])])  # what the trainer does for joint training
    assert isinstance(both, ImageSource) and both.shape == (4, 8, 8, 3)
    np.testing.assert_allclose(both[[3, 0]], IMGS[[0, 4]] / 255.0, atol=1e-7)
    with pytest.raises(IndexError):
        src[[20]]


def test_normalisation_resize_flat_and_grey_to_rgb():
    x = source(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))[[0]]
    np.testing.assert_allclose(x[0], (IMGS[0] / 255.0 - 0.5) / 0.25, atol=1e-6)
    big = ImageSource([(ArrayReader(IMGS), np.arange(20))], Preprocess(size=224))
    assert big[[0, 1]].shape == (2, 224, 224, 3)
    grey = ImageSource([(ArrayReader(IMGS[..., :1]), np.arange(20))], Preprocess(size=8, flat=True))
    g = grey[[0]]
    assert g.shape == (1, 192)
    np.testing.assert_allclose(g.reshape(8, 8, 3), np.repeat(IMGS[0, ..., :1], 3, -1) / 255.0, atol=1e-7)


def test_augmentation_is_a_crop_of_the_padded_image_or_its_flip_and_seeded():
    pre = dict(crop_pad=1, flip=True)
    a = source(True, 0, **pre)
    x = a[np.arange(20)]
    padded = np.pad(IMGS / 255.0, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(20):
        crops = [padded[i, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        crops += [c[:, ::-1] for c in crops]
        assert min(np.abs(x[i] - c).max() for c in crops) < 1e-6
    assert not np.allclose(x, IMGS / 255.0)
    np.testing.assert_array_equal(x, source(True, 0, **pre)[np.arange(20)])  # same seed: same draws
    assert not np.array_equal(x, source(True, 1, **pre)[np.arange(20)])
    np.testing.assert_allclose(source(False, 0, **pre)[np.arange(20)], IMGS / 255.0, atol=1e-7)  # test split


def test_per_backbone_preprocessing(tmp_path):
    from safetensors.numpy import save_file

    timm = str(tmp_path / "timm.safetensors")
    save_file({"cls_token": np.zeros((1, 1, 4), np.float32), "patch_embed.proj.weight": np.zeros((4, 3, 2, 2),
                                                                                                  np.float32)}, timm)
    clip = str(tmp_path / "clip.safetensors")
    save_file({"visual.class_embedding": np.zeros(4, np.float32)}, clip)
    assert preprocessing_for("vit", {}) == {}  # trained from scratch: the data set's own size and statistics
    assert preprocessing_for("vit", {"pretrained": timm}) == {"image_size": 224, "mean": HALF, "std": HALF}
    assert preprocessing_for("vit", {"pretrained": clip})["mean"] == CLIP_MEAN
    assert preprocessing_for("resnet18", {"pretrained": timm})["mean"] == (0.485, 0.456, 0.406)


def test_prefetch_keeps_order_runs_ahead_and_forwards_errors():
    produced = []

    def gen():
        for i in range(6):
            produced.append(i)
            yield i

    it = prefetch(gen(), size=2)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(produced) >= 3  # computed ahead while the consumer was busy
    assert list(it) == [1, 2, 3, 4, 5]

    def bad():
        yield 1
        raise RuntimeError("decode failed")

    it = prefetch(bad())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="decode failed"):
        next(it)
    before = threading.active_count()
    it = prefetch(iter(range(1000)), size=1)
    next(it)
    it.close()  # abandoning the iterator stops its thread
    time.sleep(0.3)
    assert threading.active_count() <= before


def test_trainer_streams_a_folder_benchmark_without_loading_it_whole(tmp_path, monkeypatch):
    from clax.methods import get_method
    from clax.models import get_backbone
    from clax.train import TrainConfig, fit, make_context

    for split, n in (("train", 6), ("test", 3)):
        for c in range(4):
            d = os.path.join(tmp_path, split, f"class{c}")
            os.makedirs(d)
            for i in range(n):
                Image.new("RGB", (8, 8), (60 * c,) * 3).save(os.path.join(d, f"{i}.png"))
    bench = image_folder(seed=0, view="flat", data_dir=str(tmp_path), num_tasks=2)

    def refuse(self, *a, **k):
        raise AssertionError("the trainer materialised a whole image source")

    monkeypatch.setattr(ImageSource, "__array__", refuse)
    ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[8]), bench, "til")
    for name in ("finetune", "joint"):  # joint concatenates the sources of tasks 0..r
        out = fit(get_method(name, ctx), ctx, bench, TrainConfig(epochs=2, batch_size=4), progress=False)
        assert np.isfinite(out["acc"]) and out["timing"]["steps"] > 0
