"""split-tinyimagenet32 (10 tasks of 20 classes) and split-tinyimagenet32-20 (20 of 10): the released
tiny-imagenet-200 layout at 32x32. A folder of 200 classes written by the test (classes and labels per task,
class order, per-class subsample, augmentation), the layout and size errors, and the CLI on the shared
32px tarball (skipped where ../shared is absent)."""
import json
import os
import subprocess

import numpy as np
import pytest

from clax.cli import main
from clax.data import get_benchmark
from clax.data.folder import split_tinyimagenet32
from test_folder import write_tiny_imagenet

IDS = [f"n{c:08d}" for c in range(200)]


def colour(c: int) -> tuple:
    """The flat colour that marks class c of 200 (red and green steps of 16 survive JPEG)."""
    return (8 + 16 * (c % 14), 8 + 16 * (c // 14), 128)


def label_of(x: np.ndarray) -> np.ndarray:
    """Class ids read back from [0, 1] pixels of flat-coloured images."""
    m = x.reshape(len(x), -1, 3).mean(1) * 255
    return np.rint((m[:, 0] - 8) / 16).astype(int) + 14 * np.rint((m[:, 1] - 8) / 16).astype(int)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny-imagenet-200 folder of 200 classes at 32x32: 2 training and 1 val image per class."""
    root = str(tmp_path_factory.mktemp("tin32-small"))
    write_tiny_imagenet(root, train_per_class=2, val_per_class=1, size=32, wnids=IDS, colour=colour)
    return root


def test_tasks_hold_20_or_10_disjoint_classes_with_labels_from_folders_and_annotations(tiny32):
    plain = dict(mean=None, std=None, augment=False)
    b = split_tinyimagenet32(seed=0, data_dir=tiny32, **plain)
    assert (b.name, b.num_tasks, b.num_classes, b.input_shape) == ("split-tinyimagenet32", 10, 200, (32, 32, 3))
    assert all(len(t.classes) == 20 for t in b.tasks)
    assert sorted(c for t in b.tasks for c in t.classes) == list(range(200))
    for t in b.tasks:
        assert set(t.y_train) == set(t.classes) and set(t.y_test) == set(t.classes)
        assert len(t.y_train) == 40 and len(t.y_test) == 20
        np.testing.assert_array_equal(label_of(t.x_train[:]), t.y_train)  # train/<wnid>/images
        np.testing.assert_array_equal(label_of(t.x_test[:]), t.y_test)  # val/val_annotations.txt
    # seeded order: a permutation drawn from the seed; natural: sorted wnids, 20 at a time
    assert b.tasks[0].classes != tuple(range(20))
    assert split_tinyimagenet32(seed=1, data_dir=tiny32, **plain).tasks[0].classes != b.tasks[0].classes
    nat = get_benchmark("split-tinyimagenet32", seed=3, view="image", data_dir=tiny32, class_order="natural")
    assert [t.classes for t in nat.tasks] == [tuple(range(20 * k, 20 * k + 20)) for k in range(10)]
    b20 = get_benchmark("split-tinyimagenet32-20", seed=0, view="flat", data_dir=tiny32, class_order="natural",
                        **plain)
    assert (b20.name, b20.num_tasks, b20.input_shape) == ("split-tinyimagenet32-20", 20, (32 * 32 * 3,))
    assert [t.classes for t in b20.tasks] == [tuple(range(10 * k, 10 * k + 10)) for k in range(20)]
    np.testing.assert_array_equal(label_of(b20.tasks[7].x_test[:]), b20.tasks[7].y_test)


def test_per_class_subsample_and_cifar_style_augmentation(tiny32):
    b = split_tinyimagenet32(seed=0, data_dir=tiny32, per_class=1)
    assert all(len(t.y_train) == 20 and sorted(t.y_train) == sorted(t.classes) for t in b.tasks)
    assert all(len(t.y_test) == 20 for t in b.tasks)  # the test set is not subsampled
    pre_tr, pre_te = b.tasks[0].x_train.pre, b.tasks[0].x_test.pre
    assert (pre_tr.crop_pad, pre_tr.flip, pre_te.crop_pad, pre_te.flip) == (4, True, 0, False)
    assert not split_tinyimagenet32(seed=0, data_dir=tiny32, augment=False).tasks[0].x_train.pre.flip
    with pytest.raises(ValueError, match=r"per_class must be an integer >= 0"):
        split_tinyimagenet32(seed=0, data_dir=tiny32, per_class=-1)


def test_missing_folder_and_64px_images_name_the_expected_layout_and_the_size_found(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"data dir .*nowhere does not exist; expected the tiny-imagenet-200 "
                                         r"layout: .*/train/<wnid>/images/\*\.JPEG, .*/val/images/\*\.JPEG and "
                                         r".*/val/val_annotations\.txt"):
        split_tinyimagenet32(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"split-tinyimagenet32 needs data_dir \(--data-dir\)"):
        get_benchmark("split-tinyimagenet32", seed=0, view="image")
    big = tmp_path / "big"
    write_tiny_imagenet(str(big), train_per_class=1, val_per_class=1, size=64)
    with pytest.raises(ValueError, match=r"expects the 32x32 re-encode of tiny-imagenet-200, but the training "
                                         r"image .*\.JPEG is 64x64; .*split-tinyimagenet for the 64x64"):
        split_tinyimagenet32(data_dir=str(big), num_tasks=2)
    # the CLI: one line on stderr, exit 2, nothing trained
    assert main(["run", "--method", "finetune", "--benchmark", "split-tinyimagenet32", "--data-dir",
                 str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expected the tiny-imagenet-200 layout" in err


@pytest.fixture(scope="module")
def shared_tin32(shared_data_dir, tmp_path_factory):
    """../shared/data/tiny-imagenet-200-32px.tar.gz extracted once (a few seconds)."""
    out = str(tmp_path_factory.mktemp("tin32"))
    subprocess.run(["tar", "-xzf", os.path.join(shared_data_dir, "tiny-imagenet-200-32px.tar.gz"), "-C", out],
                   check=True)
    return out


def test_cli_runs_split_tinyimagenet32_on_the_shared_folder(shared_tin32, tmp_path):
    b = get_benchmark("split-tinyimagenet32", seed=0, view="image", data_dir=shared_tin32)
    assert b.num_classes == 200 and b.input_shape == (32, 32, 3)
    assert [len(t.y_train) for t in b.tasks] == [20 * 500] * 10 and [len(t.y_test) for t in b.tasks] == [20 * 50] * 10
    assert b.class_names[0].startswith("goldfish")  # words.txt
    w = tmp_path / "w"
    assert main(["run", "--method", "finetune", "--benchmark", "split-tinyimagenet32", "--data-dir", shared_tin32,
                 "--epochs", "1", "--set", "data.per_class=2", "--set", "backbone.hidden=[16]",
                 "--workdir", str(w), "--quiet"]) == 0
    res = json.loads((w / "results.json").read_text())
    assert res["benchmark"] == "split-tinyimagenet32" and res["num_tasks"] == 10
    assert len(res["accuracy_matrix"]) == 10 and all(v is not None for v in res["accuracy_matrix"][-1])
    assert res["config"]["data"]["per_class"] == 2
