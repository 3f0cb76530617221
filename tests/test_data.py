import numpy as np
import pytest

from clax.data import Benchmark, Task, get_benchmark


def test_split_digits_has_five_disjoint_two_class_tasks_with_stratified_80_20_split():
    b = get_benchmark("split-digits", seed=0)
    assert b.num_tasks == 5 and b.input_shape == (64,)
    classes = [set(t.classes) for t in b.tasks]
    assert all(len(c) == 2 for c in classes)
    assert set().union(*classes) == set(range(10))
    n_train = sum(len(t.y_train) for t in b.tasks)
    n_test = sum(len(t.y_test) for t in b.tasks)
    assert n_train + n_test == 1797 and abs(n_test / 1797 - 0.2) < 0.01
    for t in b.tasks:
        assert set(np.unique(t.y_train)) == set(t.classes) == set(np.unique(t.y_test))


def test_class_order_is_fixed_by_the_seed():
    a, b, c = (get_benchmark("split-digits", seed=s) for s in (0, 0, 1))
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks]
    assert [t.classes for t in a.tasks] != [t.classes for t in c.tasks]


def test_image_view_and_permuted_digits():
    b = get_benchmark("split-digits", view="image")
    assert b.input_shape == (32, 32, 3)
    flat = get_benchmark("split-digits")
    # each 8x8 pixel becomes a 4x4 block, grey on all three channels
    np.testing.assert_array_equal(b.tasks[0].x_train[0, ::4, ::4, 1].ravel(), flat.tasks[0].x_train[0])
    p = get_benchmark("permuted-digits")
    assert p.num_tasks == 10 and all(t.classes == tuple(range(10)) for t in p.tasks)
    np.testing.assert_array_equal(np.sort(p.tasks[3].x_train, axis=1), np.sort(p.tasks[0].x_train, axis=1))
    assert not np.array_equal(p.tasks[3].x_train, p.tasks[0].x_train)


def test_til_targets_are_local_and_cil_targets_global():
    t = get_benchmark("split-digits").tasks[1]
    y = np.array(t.classes[::-1])
    assert t.targets(y, "til").tolist() == [1, 0]
    assert t.targets(y, "cil").tolist() == list(y)


def test_labels_outside_the_tasks_classes_are_refused_naming_the_label():
    x = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match="label 7"):
        Task(0, (1, 2), x, np.array([1, 2, 7, 1]), x, np.array([1, 2, 1, 2]))


def test_images_of_the_wrong_shape_are_refused_naming_the_shape():
    x = np.zeros((4, 64), np.float32)
    good = Task(0, (0, 1), x, np.array([0, 1, 0, 1]), x, np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"\(64,\).*expected \(32, 32, 3\)"):
        Benchmark("mine", (good,), 2, (32, 32, 3))
    with pytest.raises(ValueError, match="y_train has shape"):
        Task(0, (0, 1), x, np.array([0, 1]), x, np.array([0, 1, 0, 1]))


def test_eval_batches_pad_with_the_batch_own_samples_and_mask_them():
    from clax.data import eval_batches

    x = np.arange(10, dtype=np.float32).reshape(5, 2) + 1
    y = np.arange(5)
    batches = list(eval_batches(x, y, 4))
    last = batches[-1]
    np.testing.assert_array_equal(last["x"], x[[4, 4, 4, 4]])  # one real sample, repeated: no zeros
    np.testing.assert_array_equal(last["w"], [1, 0, 0, 0])
    assert sum(float(b["w"].sum()) for b in batches) == 5


def test_eval_batches_shrink_to_the_largest_test_set_and_evaluate_counts_every_row_once():
    """Every task is tested in batches of one size: train.eval_batch_size, or the largest test set
    rounded up to a multiple of 8 (and of the mesh's data axis) where that is smaller; evaluate() feeds
    the eval step batches of exactly that size and counts each test row once."""
    import types

    import jax

    from clax.train import evaluate, eval_batch_rows

    rng = np.random.default_rng(0)
    y_test = np.repeat([0, 1, 2, 3], [30, 43, 20, 25])  # task 0: 73 test rows, task 1: 45
    b = Benchmark.from_arrays("b", rng.normal(size=(8, 3)), np.arange(8) % 4, rng.normal(size=(118, 3)), y_test,
                              [[0, 1], [2, 3]])
    assert eval_batch_rows(b, 256) == 80 and eval_batch_rows(b, 64) == 64 and eval_batch_rows(b, 72) == 72
    mesh = types.SimpleNamespace(shape={"data": 3})
    assert eval_batch_rows(b, 240, mesh) == 96  # a multiple of lcm(8, 3)
    seen = []

    def eval_step(cl, batch, t):
        seen.append(batch["x"].shape[0])
        return jax.numpy.sum(batch["w"] * (batch["y"] == 0)), 0.0  # "correct": the rows of class 0

    steps = types.SimpleNamespace(eval_step=eval_step)
    assert evaluate(steps, None, b, "cil", 0, 256) == 30 / 73
    assert evaluate(steps, None, b, "cil", 1, 256) == 0.0
    assert seen == [80, 80]


def test_data_section_maps_to_benchmark_arguments_and_refuses_what_a_benchmark_lacks():
    """The config's ``data`` section: defaults pass nothing; other values become factory arguments; a
    setting the benchmark does not take, an unknown key or value is a ConfigError naming ``data.<key>``."""
    import pytest as _pytest

    from clax.config import ConfigError, apply_overrides, default_config, validate
    from clax.data.pipeline import CIFAR_MEAN, DATA_DEFAULTS, class_order, data_kwargs

    assert data_kwargs(dict(DATA_DEFAULTS)) == {}
    kw = data_kwargs({**DATA_DEFAULTS, "normalize": "none", "augment": "off", "image_size": 224,
                      "class_order": "natural", "per_class": 7})
    assert kw == {"mean": None, "std": None, "augment": False, "image_size": 224, "class_order": "natural",
                  "per_class": 7}
    assert data_kwargs({"normalize": "cifar"})["mean"] == CIFAR_MEAN
    assert class_order(6, 3, 5, "x", "natural") == [[0, 1], [2, 3], [4, 5]]
    assert sorted(sum(class_order(6, 3, 5, "x"), [])) == list(range(6))
    for bad, words in ((["data.class_order=natural"], "not a setting of benchmark 'split-digits'"),
                       (["data.augment=maybe"], "valid: default, on, off")):
        with _pytest.raises(ConfigError, match=words):
            validate(apply_overrides(default_config("finetune"), bad))
    with _pytest.raises(ConfigError, match="data.image_size must be an integer"):
        validate({**default_config("finetune"), "data": {**DATA_DEFAULTS, "image_size": -1}})
    with _pytest.raises(ConfigError, match="unknown setting data.size"):
        validate({**default_config("finetune"), "data": {"size": 3}})


def test_data_crop_pad_sets_the_augmentations_padding():
    """``data.crop_pad=N`` reaches the training images' random crop as N pixels of padding (turning the
    augmentation on); refused with ``data.augment=off`` and on a benchmark without augmentation."""
    import pytest as _pytest

    from clax.config import ConfigError, apply_overrides, default_config, validate
    from clax.data.pipeline import data_kwargs, make_preprocess

    assert data_kwargs({"crop_pad": 4}) == {"augment": 4}
    tr, te = make_preprocess("image", 64, 3, None, None, None, data_kwargs({"crop_pad": 4})["augment"])
    assert (tr.crop_pad, tr.flip, te.crop_pad) == (4, True, 0)
    tr, _ = make_preprocess("image", 64, 3, None, None, None, True)
    assert tr.crop_pad == 8  # the default: size // 8
    tr, _ = make_preprocess("image", 64, 3, None, None, None, False)
    assert (tr.crop_pad, tr.flip) == (0, False)
    with _pytest.raises(ConfigError, match="data.augment=off"):
        validate(apply_overrides(default_config("finetune", "split-cifar100"), ["data.crop_pad=4", "data.augment=off"]))
    with _pytest.raises(ConfigError, match="data.crop_pad is not a setting of benchmark 'split-digits'"):
        validate(apply_overrides(default_config("finetune"), ["data.crop_pad=4"]))
    validate(apply_overrides(default_config("finetune", "split-tinyimagenet"), ["data.crop_pad=4"]))


def test_map_rows_gives_the_full_batch_result_and_compiles_once_for_every_length():
    import jax
    import jax.numpy as jnp

    from clax.data.stream import map_rows
    from clax.metrics import CompileCounter

    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    f = jax.jit(lambda x, t: jnp.argmax(x @ w, -1) + 10 * t)  # per sample
    f(jnp.zeros((4, 5)), jnp.zeros(4, jnp.int32))  # compiled for batches of 4
    c = CompileCounter()
    for n in (1, 3, 4, 9, 13):
        x = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
        t = np.arange(n) % 2
        got = map_rows(f, x, t, batch_size=4)
        assert got.shape == (n,)
        np.testing.assert_array_equal(got, np.argmax(x @ np.asarray(w), -1) + 10 * t)
    assert c.count == 0  # every length went through the one batch-of-4 program
    # a list of parts (each task's test set) is read as their concatenation, rows as lists too
    parts = [np.random.default_rng(k).normal(size=(k, 5)).astype(np.float32) for k in (3, 1, 6)]
    ts = [np.full(len(p), k % 2) for k, p in enumerate(parts)]
    got = map_rows(f, parts, ts, batch_size=4)
    x, t = np.concatenate(parts), np.concatenate(ts)
    np.testing.assert_array_equal(got, np.argmax(x @ np.asarray(w), -1) + 10 * t)
    assert c.count == 0
