"""TFDS benchmarks under ``tfds.testing.mock_data`` (random records in the real feature layout, read
through ``tfds.data_source`` without TensorFlow)."""
import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from clax.cli import main  # noqa: E402
from clax.data import get_benchmark  # noqa: E402
from clax.data.pipeline import ImageSource  # noqa: E402


@pytest.fixture(scope="module")
def cifar100():
    with tfds.testing.mock_data(num_examples=1000):
        bench = get_benchmark("split-cifar100", seed=0, view="image")
    return bench  # images are read lazily: tests that read them enter mock_data again


def test_split_cifar100_is_10_tasks_of_10_disjoint_classes(cifar100):
    b = cifar100
    assert b.num_tasks == 10 and b.num_classes == 100 and b.input_shape == (32, 32, 3)
    sets = [set(t.classes) for t in b.tasks]
    assert all(len(s) == 10 for s in sets)
    assert set().union(*sets) == set(range(100))  # disjoint: 10 x 10 distinct ids cover all 100
    for t in b.tasks:
        assert isinstance(t.x_train, ImageSource)  # streamed, not held in memory
        assert set(np.unique(t.y_train)) <= set(t.classes) and set(np.unique(t.y_test)) <= set(t.classes)
    assert sum(len(t.y_train) for t in b.tasks) == 1000 and sum(len(t.y_test) for t in b.tasks) == 1000
    # the class order is the seed's: another seed permutes differently
    with tfds.testing.mock_data(num_examples=1000):
        other = get_benchmark("split-cifar100", seed=1, view="image")
        twenty = get_benchmark("split-cifar100-20", seed=0, view="image")
    assert [t.classes for t in other.tasks] != [t.classes for t in b.tasks]
    assert twenty.num_tasks == 20 and all(len(t.classes) == 5 for t in twenty.tasks)


def test_split_cifar100_images_are_the_records_preprocessed(cifar100):
    task = cifar100.tasks[0]
    with tfds.testing.mock_data(num_examples=1000):
        raw = tfds.data_source("cifar100", split="test")
        x = task.x_test[np.arange(4)]
        idx = task.x_test.segments[0][1][:4]
        img = np.stack([raw[int(i)]["image"] for i in idx]).astype(np.float32) / 255.0
        assert [int(raw[int(i)]["label"]) for i in idx] == list(task.y_test[:4])
    mean, std = np.asarray(task.x_test.pre.mean), np.asarray(task.x_test.pre.std)
    np.testing.assert_allclose(x, (img - mean) / std, atol=1e-5)
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32


def test_clax_run_completes_on_mock_split_cifar100(tmp_path):
    wd = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=1000):
        rc = main(["run", "--method", "finetune", "--benchmark", "split-cifar100", "--scenario", "cil", "--epochs",
                   "1", "--workdir", wd, "--quiet", "--set", "backbone.hidden=[16]", "--set", "train.batch_size=32"])
    assert rc == 0
    res = json.load(open(os.path.join(wd, "results.json")))
    A = np.asarray([[np.nan if v is None else v for v in row] for row in res["accuracy_matrix"]], float)
    assert res["num_tasks"] == 10 and A.shape == (10, 10)
    assert np.isfinite(A[np.tril_indices(10)]).all() and np.isfinite(res["acc"])
    assert res["timing"]["compiles_after_task"][-1] == res["timing"]["compiles_after_task"][0]


def test_mnist_family_and_5_datasets():
    with tfds.testing.mock_data(num_examples=200):
        sm = get_benchmark("split-mnist", seed=0, view="flat")
        pm = get_benchmark("permuted-mnist", seed=0, view="flat", num_tasks=3)
        five = get_benchmark("5-datasets", seed=0, view="image")
        x0, x1 = pm.tasks[0].x_test[:5], pm.tasks[1].x_test[:5]
        five_x = [t.x_train[:2] for t in five.tasks]
    assert sm.num_tasks == 5 and sm.input_shape == (784,) and all(len(t.classes) == 2 for t in sm.tasks)
    assert pm.num_tasks == 3 and all(t.classes == tuple(range(10)) for t in pm.tasks)
    # the same images with their pixels permuted
    assert not np.array_equal(x0, x1)
    np.testing.assert_array_equal(np.sort(x0, axis=1), np.sort(x1, axis=1))
    assert five.num_tasks == 5 and five.num_classes == 50 and five.input_shape == (32, 32, 3)
    assert [t.classes for t in five.tasks] == [tuple(range(10 * t, 10 * t + 10)) for t in range(5)]
    assert five.class_names[40:42] == ("emnist/letters:A", "emnist/letters:B")  # notMNIST's stand-in
    assert all(x.shape == (2, 32, 32, 3) for x in five_x)


def test_missing_or_unprepared_data_dir_says_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"data dir .*nope does not exist; expected a TFDS data dir holding "
                                         r".*nope/cifar100/<version>/\*\.array_record"):
        get_benchmark("split-cifar100", seed=0, view="image", data_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"'cifar100' .* not available as array_record in .*"
                                         r"tfds build cifar100 --file_format=array_record"):
        get_benchmark("split-cifar100", seed=0, view="image", data_dir=str(tmp_path))
