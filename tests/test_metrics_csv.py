"""metrics.csv holds every named loss term, the learning rate and the gradient norm of each epoch.

ibm on two tiny split-digits tasks (3 batches an epoch, 2 epochs, ``train.lr_schedule=step:1:0.5``) is run
through ``clax.runner.run`` with its compiled train step wrapped to record each step's input state and
batch. The test recomputes every step's loss terms and gradient from those inputs, outside the trainer
(``jax.value_and_grad`` of ``method.loss``, ibm's update mask, ``optax.tree.norm``), and checks each
row's ``loss``, ``ce``, ``kl`` and ``grad_norm`` against the means of the recomputed values; ``lr``
against the schedule and the rate the optimizer state held during the epoch. finetune, whose only term
is ``ce``, gets no ``kl`` column. A run stopped inside an epoch and resumed writes the same metrics.csv
bit for bit (its checkpoint carries every metric's values so far, not only the losses).
"""
import csv
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clax.train as train_mod
from battery import tiny_digits
from clax import runner
from clax.config import default_config, train_config
from clax.data import train_batches
from clax.methods import get_method
from clax.models import get_backbone
from clax.train import Steps, lr_at, make_context, make_optimizer, trainable, with_trainable

PER_EPOCH, EPOCHS, TASKS = 3, 2, 2
LR = 0.01


class Stop(Exception):
    """Raised by the recording step to stop a run after a given step."""


_BUILT: dict = {}


def _built(name: str):
    """``(cfg, (bench, ctx, method), steps, record)`` of ``name``, built and compiled once."""
    if name not in _BUILT:
        cfg = default_config(name)
        cfg["train"].update(epochs=EPOCHS, batch_size=16, eval_batch_size=64, optimizer="adam", lr=LR,
                            lr_schedule="step:1:0.5")
        cfg["backbone"]["hidden"] = [16]
        cfg["checkpoint"] = {"every_steps": 2, "keep": 1}  # inside epochs: task steps 2 and 4
        bench = tiny_digits(TASKS)
        ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[16]), bench, cfg["scenario"])
        method = get_method(name, ctx, **cfg[name])
        steps = Steps(method, make_optimizer(train_config(cfg)), ctx.scenario)
        record = {"calls": [], "stop_after": None}
        jitted = steps.train_step

        def train_step(ts, batch, t):
            ts2, m = jitted(ts, batch, t)
            record["calls"].append((ts, batch, t, m))
            if len(record["calls"]) == record["stop_after"]:
                raise Stop
            return ts2, m

        steps.train_step = train_step
        _BUILT[name] = (cfg, (bench, ctx, method), steps, record)
    return _BUILT[name]


@pytest.fixture
def run(monkeypatch):
    """Runs ``name`` in ``workdir`` with the cached method and steps; returns the recorded steps."""
    monkeypatch.setattr(runner, "build", lambda cfg: _built(cfg["method"])[1])
    monkeypatch.setattr(train_mod, "Steps", lambda method, tx, scenario, options=None: _built(method.name)[2])
    monkeypatch.setattr(runner, "accuracy_heatmap", lambda *a, **k: None)

    def go(name, workdir, stop_after=None):
        record = _built(name)[3]
        record.update(calls=[], stop_after=stop_after)
        try:
            runner.run(_built(name)[0], str(workdir), progress=False)
        finally:
            record["stop_after"] = None
        return list(record["calls"])
    return go


def _read(w) -> tuple[list, list]:
    with open(w / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _recompute(method, ts, batch, t):
    """One step's loss terms and gradient norms, from its input state, outside the trainer."""
    _, sub = jax.random.split(ts.key)
    tr = trainable(ts.cl, t)
    (loss, (_, terms)), grads = jax.value_and_grad(
        lambda tr: method.loss(with_trainable(ts.cl, t, tr), batch, sub, t), has_aux=True)(tr)
    mask = method.update_mask(ts.cl, t)
    masked = jax.tree.map(lambda m, g: np.where(m, g, 0), mask, grads)
    return {"loss": float(loss), **{k: float(v) for k, v in terms.items()},
            "grad_norm": float(optax.tree.norm(masked)), "unmasked": float(optax.tree.norm(grads)),
            "lr": float(ts.opt_state.hyperparams["learning_rate"])}


_REF: dict = {}


@pytest.fixture
def ibm_reference(run, tmp_path_factory):
    if not _REF:
        w = tmp_path_factory.mktemp("ibm-reference")
        _REF.update(w=w, calls=run("ibm", w))
    return _REF


def test_ibm_rows_hold_the_epoch_means_of_its_terms_the_lr_and_the_masked_gradient_norm(ibm_reference):
    method = _built("ibm")[1][2]
    cols, rows = _read(ibm_reference["w"])
    assert cols == ["task", "epoch", "loss", "ce", "kl", "lr", "grad_norm", "seconds"]
    calls = ibm_reference["calls"]
    assert len(calls) == TASKS * EPOCHS * PER_EPOCH and len(rows) == TASKS * EPOCHS
    masked_differs = False
    for i, row in enumerate(rows):
        r, epoch = divmod(i, EPOCHS)
        assert (int(row["task"]), int(row["epoch"])) == (r, epoch)
        mine = calls[i * PER_EPOCH:(i + 1) * PER_EPOCH]
        redo = [_recompute(method, ts, batch, t) for ts, batch, t, _ in mine]
        for k in ("loss", "ce", "kl", "grad_norm"):
            # the epoch's mean of the values recomputed outside the trainer
            np.testing.assert_allclose(float(row[k]), np.mean([d[k] for d in redo]), rtol=2e-5, err_msg=k)
            # and exactly the float32 mean of the compiled step's values
            assert float(row[k]) == float(jnp.mean(jnp.stack([m[k] for *_, m in mine]))), k
        assert float(row["grad_norm"]) > 0
        # the rate in effect: the schedule's, and the one the optimizer state held at every step of the epoch
        assert float(row["lr"]) == lr_at(train_config(_built("ibm")[0]), epoch) == LR * 0.5 ** epoch
        assert all(np.float32(d["lr"]) == np.float32(float(row["lr"])) for d in redo)
        masked_differs |= any(abs(d["unmasked"] - d["grad_norm"]) > 1e-3 * d["grad_norm"] for d in redo)
    assert masked_differs  # task 1's mask zeroes part of the gradient: the column is the masked norm


def test_a_method_gets_its_own_terms_and_no_other(run, tmp_path):
    w = tmp_path / "w"
    run("finetune", w)
    cols, rows = _read(w)
    assert cols == ["task", "epoch", "loss", "ce", "lr", "grad_norm", "seconds"]  # no kl: not finetune's
    assert all(row[c] != "" for row in rows for c in cols)


def test_fit_returns_the_rows_it_logs(run):
    cfg, (bench, ctx, method), _, _ = _built("finetune")
    logged = []
    out = train_mod.fit(method, ctx, bench, train_config(cfg), progress=False, log=logged.append)
    assert [list(r) for r in out["history"]] == [["task", "epoch", "loss", "ce", "lr", "grad_norm", "seconds"]] * 4
    assert out["history"] == logged


def test_a_run_stopped_inside_an_epoch_and_resumed_writes_the_same_metrics(run, ibm_reference, tmp_path):
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    ref_cols, ref_rows = _read(ibm_reference["w"])
    w = tmp_path / "w"
    with pytest.raises(Stop):
        run("ibm", w, stop_after=5)  # the newest checkpoint: task 0, epoch 1, after its first step
    meta = json.loads((w / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["task_step"] == 4
    assert {k: len(v) for k, v in meta["epoch_metrics"].items()} == {"loss": 1, "ce": 1, "kl": 1, "grad_norm": 1}
    old = tmp_path / "old"  # the same checkpoint as an older clax wrote it: the losses only
    shutil.copytree(w, old)
    meta.pop("epoch_metrics")
    meta["epoch_losses"] = json.loads((w / "checkpoints" / "4" / "meta" / "metadata").read_text()
                                      )["epoch_metrics"]["loss"]
    (old / "checkpoints" / "4" / "meta" / "metadata").write_text(json.dumps(meta))

    run("ibm", w)
    cols, rows = _read(w)
    assert cols == ref_cols and strip(rows) == strip(ref_rows)  # every column, bit for bit

    run("ibm", old)
    cols, rows = _read(old)
    assert cols == ref_cols
    for i, (row, ref) in enumerate(zip(strip(rows), strip(ref_rows))):
        if i == 1:  # the resumed epoch: its loss exact, no mean over part of it for the other terms
            assert row == {**ref, "ce": "", "kl": "", "grad_norm": ""}
        else:
            assert row == ref


def test_a_loss_term_named_like_a_trainer_column_is_refused():
    cfg, (bench, ctx, method), _, _ = _built("finetune")

    def loss(cl, batch, key, t):
        total, (state, terms) = method.loss(cl, batch, key, t)
        return total, (state, {**terms, "lr": total})

    tx = make_optimizer(train_config(cfg))
    cl = method.init(jax.random.PRNGKey(0))
    ts = train_mod.TrainState(cl, tx.init(trainable(cl, 0)), jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
    task = bench.tasks[0]
    batch = next(iter(train_batches(task.x_train, task.targets(task.y_train, ctx.scenario), 16,
                                    np.random.default_rng(0), np.zeros(48, np.int32))))
    with pytest.raises(ValueError, match="method 'finetune' returns a loss term named 'lr'; that name is a "
                                         "metrics.csv column of the trainer"):
        Steps(method._replace(loss=loss), tx, ctx.scenario).train_step(ts, batch, jnp.int32(0))


def test_a_user_optimizer_gets_no_lr_column_of_the_config():
    cfg, (bench, ctx, method), _, _ = _built("finetune")
    tcfg = train_config({**cfg, "train": {**cfg["train"], "lr_schedule": "constant"}})
    out = train_mod.fit(method, ctx, bench, tcfg, progress=False, optimizer=optax.sgd(0.05))
    assert [list(r) for r in out["history"]] == [["task", "epoch", "loss", "ce", "grad_norm", "seconds"]] * 4
