"""The trainer's protocol features (issue 15): the validation split (``train.val_fraction``), the plateau
schedule (``train.lr_schedule=plateau:PATIENCE:FACTOR:FLOOR``), early stopping (``train.early_stop``),
the best-epoch restore (``train.restore_best``) and ``train.val_metric``.

The rule is tested as the pure function :func:`clax.train.val_update` and through :func:`clax.train.fit`
with a validation sequence the test controls (``clax.train.validate`` replaced), on finetune over two
tiny split-digits tasks; the split is checked on its own and against the rows the method's hooks see.
Resume exactness with these features is in tests/test_resume_every_step.py.
"""
import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest

import clax.train as train_mod
from battery import tiny_digits
from clax import checkpoint as ckpt
from clax import runner
from clax.config import ConfigError, default_config, validate
from clax.methods import get_method
from clax.models import get_backbone
from clax.train import (TrainConfig, ValState, fit, make_context, val_update, validation_data, validation_split,
                        validation_splits)

PER_EPOCH = 2  # batches per epoch: 48 rows, 20% held out -> 39 trained, batches of 24 -> 2


@pytest.fixture(scope="module")
def setup():
    bench = tiny_digits(2)
    ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[16]), bench, "til")
    return bench, ctx, get_method("finetune", ctx)


def _cfg(**kw):
    return TrainConfig(**{"epochs": 4, "batch_size": 24, "eval_batch_size": 64, "val_fraction": 0.2, **kw})


def _scripted(monkeypatch, values: dict):
    """Replaces the validation pass by ``values[task][epoch]`` (as loss and as accuracy)."""
    seen: dict = {}

    def fake(steps, cl, sets, batch_size, mesh=None):
        task = sets[0][0]
        e = seen.get(task, 0)
        seen[task] = e + 1
        return float(values[task][e]), float(values[task][e])

    monkeypatch.setattr(train_mod, "validate", fake)


# ---- the split ------------------------------------------------------------------------------------

def test_the_split_is_disjoint_stratified_seeded_and_the_authors_count():
    y = np.repeat(np.arange(4), [40, 25, 9, 3])
    rng = np.random.default_rng(0)
    y = y[rng.permutation(len(y))]
    tr, va = validation_split(y, 0.1, seed=3, task=2)
    assert np.intersect1d(tr, va).size == 0 and np.array_equal(np.union1d(tr, va), np.arange(len(y)))
    assert len(va) == math.floor(0.1 * len(y)) == 7  # WSN's int(pc_valid * n)
    for c, n in zip(range(4), [40, 25, 9, 3]):  # each class holds out its share, give or take one row
        assert abs((y[va] == c).sum() - 0.1 * n) < 1
    again = validation_split(y, 0.1, seed=3, task=2)[1]
    assert np.array_equal(va, again)
    assert not np.array_equal(va, validation_split(y, 0.1, seed=3, task=1)[1])  # drawn per task
    assert not np.array_equal(va, validation_split(y, 0.1, seed=4, task=2)[1])  # and per seed


def test_validation_rows_come_in_a_seeded_order_that_mixes_the_classes():
    """As the authors' random_split / np.random.permutation give them: a validation batch of a class-sorted
    task (image folders are read class by class) is not one class, which batch-statistics BN needs."""
    y = np.repeat(np.arange(2), 100)  # class-sorted rows, as a folder gives them
    tr, va = validation_split(y, 0.2, seed=0, task=0)
    assert np.array_equal(tr, np.sort(tr))  # the training rows stay sorted (the epochs shuffle them)
    assert not np.array_equal(va, np.sort(va)) and len(set(y[va[:8]].tolist())) == 2
    np.testing.assert_array_equal(va, validation_split(y, 0.2, seed=0, task=0)[1])


def test_held_out_rows_are_never_what_the_method_trains_on_or_its_hooks_read(setup):
    bench, ctx, method = setup
    splits = validation_splits(bench, 0.2, 0)
    seen = []

    def spy(name, hook):
        def wrapped(cl, data, *rest):
            seen.append((name, data.t, np.asarray(data.x)))
            return hook(cl, data, *rest)
        return wrapped

    m = method._replace(begin_task=spy("begin", method.begin_task), end_task=spy("end", method.end_task),
                        end_epoch=spy("epoch", lambda cl, data, epoch: cl))
    out = fit(m, ctx, bench, _cfg(epochs=1), progress=False)
    assert {(n, t) for n, t, _ in seen} == {(n, t) for n in ("begin", "end", "epoch") for t in (0, 1)}
    for _, t, x in seen:
        tr, va = splits[t]
        np.testing.assert_array_equal(x, bench.tasks[t].x_train[tr])
        assert len(va) == 9 and len(tr) == 39
    assert out["timing"]["steps"] == 2 * PER_EPOCH  # ceil(39 / 24) batches an epoch: only the kept rows
    (c, xv, yv), = validation_data(bench, 1, "til", False, splits)  # the held-out rows, the task's targets
    np.testing.assert_array_equal(xv, bench.tasks[1].x_train[splits[1][1]])
    np.testing.assert_array_equal(yv, bench.tasks[1].targets(bench.tasks[1].y_train[splits[1][1]], "til"))
    assert out["task_training"] == [{"task": t, "epochs": 1, "best_epoch": 0, "stopped": "epochs"} for t in (0, 1)]
    row = out["history"][0]
    assert 0 <= row["val_acc"] <= 1 and row["val_loss"] > 0


def test_cumulative_training_validates_on_every_trained_task(setup):
    bench, _, _ = setup
    splits = validation_splits(bench, 0.2, 0)
    sets = validation_data(bench, 1, "til", True, splits)
    assert [c for c, _, _ in sets] == [0, 1]
    x, y, tid = train_mod.task_training_data(bench, 1, "til", True, splits)
    assert len(y) == 2 * 39 and list(np.bincount(tid)) == [39, 39]


# ---- the rule, as a pure function -----------------------------------------------------------------

def _run_rule(values, **kw):
    cfg = _cfg(**{"epochs": len(values), **kw})
    vs, out = ValState(cfg.lr), []
    for e, v in enumerate(values):
        vs = val_update(vs, v, e, cfg)
        out.append(vs)
        if vs.stop:
            break
    return out


def test_plateau_cuts_after_exactly_patience_flat_epochs_restarts_the_count_and_stops_below_the_floor():
    # patience 2, factor 2, floor 3e-4 from lr 1e-3: cuts to 5e-4 then 2.5e-4 (< floor: stop)
    states = _run_rule([1.0, 0.9, 0.9, 0.95, 0.8, 0.85, 0.85, 0.1], lr=1e-3, lr_schedule="plateau:2:2:3e-4")
    assert [s.lr for s in states] == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4]
    assert [s.wait for s in states] == [0, 0, 1, 0, 0, 1, 0]
    assert [s.best_epoch for s in states] == [0, 1, 1, 1, 4, 4, 4]
    assert states[-1].stop == "plateau_floor" and states[-1].epochs == 7
    assert not any(s.stop for s in states[:-1])


def test_a_tie_is_no_improvement_acc_is_higher_better_nan_never_improves():
    tie = _run_rule([0.5, 0.5, 0.5], lr_schedule="plateau:2:2:0")
    assert [s.best_epoch for s in tie] == [0, 0, 0] and tie[-1].lr == pytest.approx(5e-4)
    acc = _run_rule([0.5, 0.7, 0.6], val_metric="acc")
    assert [s.best_epoch for s in acc] == [0, 1, 1] and acc[-1].best == 0.7
    nan = _run_rule([math.nan, 2.0])
    assert nan[0].best is None and nan[0].best_epoch == -1 and nan[1].best_epoch == 1


def test_early_stop_counts_from_the_last_improvement_not_from_a_rate_cut():
    states = _run_rule([1.0, 2.0, 2.0, 0.5, 2.0, 2.0, 2.0, 2.0], lr_schedule="plateau:1:2:0", early_stop=3)
    assert [s.stale for s in states] == [0, 1, 2, 0, 1, 2, 3]
    assert [s.wait for s in states] == [0, 0, 0, 0, 0, 0, 0]  # patience 1: a cut after every flat epoch
    assert states[-1].stop == "early_stop" and states[-1].epochs == 7 and states[-1].best_epoch == 3


# ---- the rule, through fit ------------------------------------------------------------------------

def test_fit_follows_the_plateau_rates_and_stops_each_task_on_its_own(setup, monkeypatch):
    bench, ctx, method = setup
    _scripted(monkeypatch, {0: [1.0, 0.9, 0.9, 0.95, 0.8, 0.85, 0.85, 0.1],  # stops after epoch 6
                            1: [1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]})  # always better: all 8 epochs
    out = fit(method, ctx, bench, _cfg(epochs=8, lr=1e-3, lr_schedule="plateau:2:2:3e-4"), progress=False)
    lrs = {t: [r["lr"] for r in out["history"] if r["task"] == t] for t in (0, 1)}
    assert lrs[0] == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4]  # the rate each epoch trained with
    assert lrs[1] == [1e-3] * 8  # the next task starts again from train.lr
    assert out["task_training"] == [{"task": 0, "epochs": 7, "best_epoch": 4, "stopped": "plateau_floor"},
                                    {"task": 1, "epochs": 8, "best_epoch": 7, "stopped": "epochs"}]
    assert out["timing"]["steps"] == (7 + 8) * PER_EPOCH
    assert [r["val_loss"] for r in out["history"][:7]] == [1.0, 0.9, 0.9, 0.95, 0.8, 0.85, 0.85]


def test_fit_applies_the_cut_rate_to_the_optimizer(setup, monkeypatch):
    bench, ctx, method = setup
    one = type(bench)(bench.name, bench.tasks[:1], bench.num_classes, bench.input_shape)
    ctx1 = make_context(ctx.backbone, one, "til")
    _scripted(monkeypatch, {0: [1.0, 2.0, 2.0, 2.0]})
    out = fit(get_method("finetune", ctx1), ctx1, one, _cfg(epochs=4, lr=1e-3, lr_schedule="plateau:1:4:0"),
              progress=False)
    assert [r["lr"] for r in out["history"]] == [1e-3, 1e-3, 2.5e-4, 6.25e-5]
    assert float(out["state"].opt_state.hyperparams["learning_rate"]) == pytest.approx(6.25e-5)


def test_fit_stops_early_and_restore_best_returns_the_best_epochs_state_exactly(setup, monkeypatch):
    bench, ctx, method = setup
    _scripted(monkeypatch, {0: [3.0, 1.0, 2.0, 2.0], 1: [3.0, 1.0, 2.0, 2.0]})
    states = {}

    def keep(task, epoch, ts):
        states[(task, epoch)] = jax.device_get(ts.cl)

    out = fit(method, ctx, bench, _cfg(epochs=4, early_stop=2, restore_best=True), progress=False,
              on_epoch_end=keep)
    assert out["task_training"] == [{"task": t, "epochs": 4, "best_epoch": 1, "stopped": "early_stop"}
                                    for t in (0, 1)]
    final = jax.device_get(out["state"].cl)
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), final, states[(1, 1)])
    assert all(jax.tree.leaves(same))
    last = jax.tree.map(lambda a, b: np.array_equal(a, b), final, states[(1, 3)])
    assert not all(jax.tree.leaves(last))  # the last epoch's state differs: the restore did something


def test_without_restore_best_the_last_epochs_state_stays(setup, monkeypatch):
    bench, ctx, method = setup
    _scripted(monkeypatch, {0: [3.0, 1.0, 2.0], 1: [3.0, 1.0, 2.0]})
    states = {}
    out = fit(method, ctx, bench, _cfg(epochs=3), progress=False,
              on_epoch_end=lambda t, e, ts: states.__setitem__((t, e), jax.device_get(ts.cl)))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, jax.device_get(out["state"].cl), states[(1, 2)])))


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sets, names", [
    ({"lr_schedule": "plateau:6:2:1e-6"}, "train.lr_schedule=plateau:6:2:1e-6 needs a validation set"),
    ({"early_stop": 5}, "train.early_stop=5 needs a validation set"),
    ({"restore_best": True}, "train.restore_best=true needs a validation set"),
    ({"val_fraction": 0.1, "lr_schedule": "plateau:6:2"}, "train.lr_schedule 'plateau:6:2' is not valid"),
    ({"val_fraction": 0.1, "lr_schedule": "plateau:0:2:1e-6"}, "PATIENCE an integer >= 1"),
    ({"val_fraction": 0.1, "lr_schedule": "plateau:6:1:1e-6"}, "FACTOR a number > 1"),
    ({"val_fraction": 0.1, "lr_schedule": "plateau:6:2:-1"}, "train.lr_schedule 'plateau:6:2:-1'"),
    ({"val_fraction": 1.0}, "train.val_fraction"),
    ({"val_fraction": 0.1, "val_metric": "f1"}, "train.val_metric"),
    ({"val_fraction": 0.1, "early_stop": -1}, "train.early_stop"),
])
def test_bad_protocol_settings_are_config_errors_naming_the_setting(sets, names):
    cfg = default_config("finetune")
    cfg["train"].update(sets)
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        validate(cfg)


def test_a_split_that_empties_a_class_is_a_config_error_before_the_workdir_is_touched(tmp_path, monkeypatch):
    (tmp_path / "tinybench.py").write_text(
        "import numpy as np\nfrom clax.data import Benchmark\n"
        "def make(seed=0):\n"
        "    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)\n"
        "    y = np.array([0, 0, 0, 0, 1])\n"
        "    return Benchmark.from_arrays('tiny', x, y, x, y, class_order=[[0, 1]])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = default_config("finetune", "tinybench:make")
    # 3 rows held out: class 0's share 2.4 -> 2, class 1's 0.6 -> 0, the third to the larger remainder: class 1's only row
    cfg["train"].update(val_fraction=0.6)
    with pytest.raises(ConfigError, match=r"train.val_fraction=0.6 leaves class 1 of task 0 with no training row"):
        runner.run(cfg, str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w" / "checkpoints").exists()
    cfg["train"].update(val_fraction=0.05)
    with pytest.raises(ConfigError, match=r"train.val_fraction=0.05 holds out no row of task 0"):
        runner.run(cfg, None, progress=False)


# ---- what a workdir records -----------------------------------------------------------------------

def test_workdir_records_validation_columns_and_task_training_and_old_configs_resume(tmp_path):
    cfg = default_config("finetune")
    cfg["train"].update(epochs=2, val_fraction=0.1, lr_schedule="plateau:1:2:0", restore_best=True)
    cfg["log"]["tensorboard"] = True
    w = tmp_path / "w"
    res = runner.run(cfg, str(w), progress=False)
    assert [r["task"] for r in res["task_training"]] == list(range(res["num_tasks"]))
    assert all(r["stopped"] == "epochs" and r["epochs"] == 2 for r in res["task_training"])
    header = (w / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-5:] == ["val_loss", "val_acc", "lr", "grad_norm", "seconds"]
    if importlib.util.find_spec("tensorboard"):  # reading event files needs TensorBoard (writing does not)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(str(w / "tb"), size_guidance={"scalars": 0}).Reload()
        assert {"val/loss", "val/acc", "opt/lr"} <= set(acc.Tags()["scalars"])
        assert len(acc.Scalars("val/acc")) == 2 * res["num_tasks"]
    # a config saved before these settings existed reads as their defaults and resumes (here: the finished run)
    plain = default_config("finetune")
    plain["train"].update(epochs=1)
    w2 = tmp_path / "old"
    runner.run(plain, str(w2), progress=False)
    for step in os.listdir(w2 / "checkpoints"):
        f = w2 / "checkpoints" / step / "config" / "metadata"
        saved = json.loads(f.read_text())
        for k in ckpt.TRAIN_ADDED:
            saved["train"].pop(k)
        saved["data"].pop("crop_pad")  # a data key added later reads as its default too
        f.write_text(json.dumps(saved))
    again = runner.run(plain, str(w2), progress=False)
    assert again["accuracy_matrix"] == json.loads((w2 / "results.json").read_text())["accuracy_matrix"]
    assert "task_training" not in again
