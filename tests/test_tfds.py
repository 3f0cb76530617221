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


def test_every_tfds_factory_takes_the_data_settings():
    """The config's data.class_order and data.per_class reach every TFDS factory (a factory without them
    would make the setting a ConfigError)."""
    import inspect

    from clax.data import BENCHMARKS
    from clax.data import tfds as T
    from clax.data.pipeline import benchmark_kwargs

    names = [n for n, f in BENCHMARKS.items() if getattr(f, "__module__", "") == T.__name__]
    assert {"split-cifar100", "5-datasets", "permuted-mnist", "imagenet-r"} <= set(names)
    for n in names + ["cifar10-cifar100"]:
        f = BENCHMARKS[n] if n in BENCHMARKS else T.cifar10_cifar100
        kw = benchmark_kwargs(f, {"data": {"class_order": "natural", "per_class": 5}}, n)
        assert kw["class_order"] == "natural" and kw["per_class"] == 5
        params = inspect.signature(f).parameters
        assert "class_order" in params and "per_class" in params or any(
            p.kind is p.VAR_KEYWORD for p in params.values()), n
    with pytest.raises(ValueError, match=r"split-cifar100: class_order='sorted' is not valid; valid: seeded, natural"):
        T.split_cifar100(class_order="sorted")
    with pytest.raises(ValueError, match=r"5-datasets: per_class must be an integer >= 0"):
        T.five_datasets(per_class=-1)


def test_natural_class_order_and_per_class_subsample():
    with tfds.testing.mock_data(num_examples=1000):
        nat = get_benchmark("split-cifar100", seed=3, view="image", class_order="natural")
        few = get_benchmark("split-cifar100", seed=3, view="image", per_class=2)
        few_again = get_benchmark("split-cifar100", seed=3, view="image", per_class=2)
        few_other = get_benchmark("split-cifar100", seed=4, view="image", per_class=2)
        seeded = get_benchmark("split-cifar100", seed=3, view="image")
        pm = get_benchmark("permuted-mnist", seed=0, view="flat", num_tasks=2, per_class=3)
    assert [t.classes for t in nat.tasks] == [tuple(range(10 * t, 10 * t + 10)) for t in range(10)]
    # per_class changes only the training rows: at most 2 of each class, the same classes, every test row
    assert [t.classes for t in few.tasks] == [t.classes for t in seeded.tasks]
    for t, full in zip(few.tasks, seeded.tasks):
        counts = np.bincount(t.y_train, minlength=100)
        full_counts = np.bincount(full.y_train, minlength=100)
        np.testing.assert_array_equal(counts, np.minimum(full_counts, 2))
        assert set(t.x_train.segments[0][1]) <= set(full.x_train.segments[0][1])
        np.testing.assert_array_equal(t.y_test, full.y_test)
    pos = [t.x_train.segments[0][1] for t in few.tasks]
    assert all(np.array_equal(a, t.x_train.segments[0][1]) for a, t in zip(pos, few_again.tasks))  # seeded
    assert any(not np.array_equal(a, t.x_train.segments[0][1]) for a, t in zip(pos, few_other.tasks))
    assert all(np.bincount(t.y_train).max() <= 3 for t in pm.tasks) and len(pm.tasks[0].y_train) <= 30


#: the stream's registry name
C10C100 = "cifar10-cifar100"


@pytest.fixture(scope="module")
def c10c100():
    with tfds.testing.mock_data(num_examples=400):
        nat = get_benchmark(C10C100, seed=0, view="image", class_order="natural")
        seeded = get_benchmark(C10C100, seed=0, view="image")
        other = get_benchmark(C10C100, seed=1, view="image")
        six = get_benchmark(C10C100, seed=0, view="image", class_order="natural", num_tasks=6)
    return nat, seeded, other, six


def test_cifar10_cifar100_is_hembeds_11_task_stream(c10c100):
    """Task 0 is CIFAR-10, task i >= 1 CIFAR-100's labels 10(i-1)..10i-1 in natural order (the authors'
    get_split_cifar_handlers); the images are the records of the right data set, ImageNet-normalised."""
    nat, seeded, other, six = c10c100
    assert nat.num_tasks == 11 and nat.num_classes == 110 and nat.input_shape == (32, 32, 3)
    assert [t.classes for t in nat.tasks] == [tuple(range(10 * t, 10 * t + 10)) for t in range(11)]
    assert [t.targets(t.y_train[:3], "til").max() < 10 for t in nat.tasks]  # TIL: 10-way problems
    assert six.num_tasks == 6 and six.tasks[-1].classes == tuple(range(50, 60))
    # seeded: CIFAR-10 stays task 0, the CIFAR-100 classes are dealt out by the seed
    for b in (seeded, other):
        assert b.tasks[0].classes == tuple(range(10))
        assert set().union(*[set(t.classes) for t in b.tasks[1:]]) == set(range(10, 110))
    assert [t.classes for t in seeded.tasks] != [t.classes for t in other.tasks]
    assert [t.classes for t in seeded.tasks] != [t.classes for t in nat.tasks]
    t0, t3 = nat.tasks[0], nat.tasks[3]
    with tfds.testing.mock_data(num_examples=400):
        for task, ds_name, off in ((t0, "cifar10", 0), (t3, "cifar100", 10)):
            raw = tfds.data_source(ds_name, split="test")
            (reader, idx), = [s for s in task.x_test.segments]
            assert reader.name == ds_name
            assert [int(raw[int(i)]["label"]) + off for i in idx[:5]] == list(task.y_test[:5])
            img = np.stack([raw[int(i)]["image"] for i in idx[:2]]).astype(np.float32) / 255.0
            mean, std = np.asarray([0.485, 0.456, 0.406]), np.asarray([0.229, 0.224, 0.225])
            np.testing.assert_allclose(task.x_test[np.arange(2)], (img - mean) / std, atol=1e-5)
    assert t3.x_train.augment and t3.x_train.pre.crop_pad == 4 and t3.x_train.pre.flip  # the authors' crop + flip
    assert not t3.x_test.augment
    with pytest.raises(ValueError, match=r"cifar10-cifar100: num_tasks must be an integer from 1 to 11"):
        get_benchmark(C10C100, seed=0, view="image", num_tasks=12)
