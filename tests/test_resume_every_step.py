"""A run stopped after any step of tasks 0 and 1, and resumed, ends exactly as an uninterrupted run.

For ibm, packnet, wsn, hnet and pah on two tiny split-digits tasks (3 batches an epoch, 2 epochs, so
that the ``end_epoch`` hooks fire: ibm's SVD and packnet's prune at the end of epoch 0) with
``checkpoint.every_steps`` equal to the batches per epoch, each run is stopped through the API:

* right after train step ``g`` (g = 1..12, every in-task step of both tasks), before anything that
  follows it; the workdir then holds the checkpoints written before that step, exactly what a kill
  anywhere between the previous checkpoint and the next one leaves (nothing else is written to the
  workdir while a run trains: ``results.json`` and ``metrics.csv`` come after the last checkpoint);
* right after each checkpoint has been written: the epoch-boundary one inside each task (after the
  epoch's ``end_epoch`` hook, its mean loss and its metrics row) and each task-end one. The last one
  is the kill between the final checkpoint and ``results.json``/``metrics.csv``; there the test also
  leaves truncated ``results.json`` and ``metrics.csv`` behind (a kill while they were written).

The stopped run is then run again in the same workdir and compared with an uninterrupted run:

* state: every array of the final (task-end) checkpoint, bit for bit, and the set of checkpoints kept
  (``checkpoint.keep=1``: every task-end checkpoint and the newest one inside a task, also across a
  resume);
* ``results.json``: every field except those that describe the process rather than the run:
  ``timing.train_s`` (wall-clock seconds) and the compile counts ``timing.compiles``, ``timing.traces``
  and ``timing.compiles_after_task`` (a resumed process compiles its steps again; a finished run run
  again compiles nothing). ``timing.steps`` is compared;
* ``metrics.csv``: every row and column except ``seconds`` (wall-clock): the mean loss, each of the
  method's named loss terms (all have ``ce``), ``lr`` and ``grad_norm``.

The protocol features (issue 15) get the same treatment on replay (its memory reads the task's data):
``train.val_fraction`` with a ``plateau`` schedule, ``early_stop`` and ``restore_best``, checkpointed every
2 steps (3 batches an epoch, so checkpoints fall inside epochs and at their ends), stopped after every step
and after every checkpoint of the reference run, and resumed: the same state, results (with
``task_training``), metrics rows (with ``val_loss``, ``val_acc`` and the plateau's ``lr``) and checkpoints.

To keep it cheap every run of a method shares one method object and one compiled :class:`Steps`
(``clax.runner.build`` and ``clax.train.Steps`` are replaced by cached ones), so nothing recompiles
between kill points, and the accuracy plot (not compared) is not drawn.
"""
import csv
import functools
import json
import os

import jax
import pytest

import clax.train as train_mod
from clax import checkpoint as ckpt
from battery import tiny_digits
from clax import runner
from clax.config import default_config, train_config
from clax.methods import get_method
from clax.models import get_backbone
from clax.train import Steps, make_context, make_optimizer

METHODS = ("ibm", "packnet", "wsn", "hnet", "pah")
PER_EPOCH, EPOCHS, TASKS = 3, 2, 2  # batches per epoch (48 samples in batches of 16), epochs, tasks
TASK_STEPS = PER_EPOCH * EPOCHS
SETTINGS = {  # small shapes; packnet prunes at the end of epoch 0 (ibm's SVD fires there by default)
    "packnet": {"prune_after": 1},
    "hnet": {"chunk_size": 256, "task_emb_dim": 8, "chunk_emb_dim": 8, "hidden": [16, 16]},
}
CHECKPOINT_STEPS = [g for g in range(1, TASKS * TASK_STEPS + 1) if g % PER_EPOCH == 0]
KILLS = [("after step", g) for g in range(1, TASKS * TASK_STEPS + 1)] + [
    ("after checkpoint", g) for g in CHECKPOINT_STEPS]
# timing fields that describe the process, not the run (see the module docstring)
# the protocol run: replay with a validation split, plateau, early stopping and best-state restore
PROTOCOL = "replay"
PROTOCOL_EPOCHS, PROTOCOL_EVERY = 4, 2
PROTOCOL_TRAIN = {"epochs": PROTOCOL_EPOCHS, "val_fraction": 0.25, "lr_schedule": "plateau:1:2:1e-3",
                  "early_stop": 2, "restore_best": True, "val_metric": "acc", "lr": 0.05}
PROCESS_FIELDS = ("train_s", "compiles", "compile_s", "compile_cache_hits", "step_traces", "traces",
                  "compiles_after_task")


class Stop(Exception):
    """Raised by the test's hooks to stop a run at a kill point."""


_BUILT: dict = {}


def _built(name: str):
    """``(cfg, build result, Steps, plan)`` of ``name``, made once per method."""
    if name not in _BUILT:
        cfg = default_config(name)
        cfg["train"].update(epochs=EPOCHS, batch_size=16, eval_batch_size=64)
        cfg["backbone"]["hidden"] = [32, 32]
        cfg[name].update(SETTINGS.get(name, {}))
        cfg["checkpoint"] = {"every_steps": PER_EPOCH, "keep": 1}
        if name == PROTOCOL:  # 48 rows, 12 held out: 36 trained in 3 batches of 16
            cfg["train"].update(PROTOCOL_TRAIN)
            cfg["checkpoint"]["every_steps"] = PROTOCOL_EVERY
        cfg["log"]["tensorboard"] = False  # event files and figures are tested in test_tracking.py
        bench = tiny_digits(TASKS)
        ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[32, 32]), bench, cfg["scenario"])
        method = get_method(name, ctx, **cfg[name])
        steps = Steps(method, make_optimizer(train_config(cfg), method), ctx.scenario)
        plan = {"after_step": None, "after_checkpoint": None, "taken": 0, "saved": []}
        jitted = steps.train_step

        def train_step(*args):
            out = jitted(*args)
            plan["taken"] += 1
            if plan["taken"] == plan["after_step"]:
                raise Stop
            return out

        steps.train_step = train_step
        _BUILT[name] = (cfg, (bench, ctx, method), steps, plan)
    return _BUILT[name]


@pytest.fixture
def hooks(monkeypatch):
    """Runs through ``clax.runner.run`` with the cached method and steps, and stops at the plan's point."""
    monkeypatch.setattr(runner, "build", lambda cfg: _built(cfg["method"])[1])
    monkeypatch.setattr(train_mod, "Steps", lambda method, tx, scenario, options=None: _built(method.name)[2])
    save = ckpt.save_progress

    def save_then_stop(mngr, ts, progress, config, rows=None):
        step = save(mngr, ts, progress, config, rows)
        _built(config["method"])[3]["saved"].append(step)
        if step == _built(config["method"])[3]["after_checkpoint"]:
            mngr.wait_until_finished()
            raise Stop
        return step

    monkeypatch.setattr(ckpt, "save_progress", save_then_stop)
    monkeypatch.setattr(runner, "accuracy_heatmap", lambda *a, **k: None)  # a plot, 0.2 s a run, not compared

    def run(name, workdir, after_step=None, after_checkpoint=None):
        plan = _built(name)[3]
        plan.update(after_step=after_step, after_checkpoint=after_checkpoint, taken=0, saved=[])
        try:
            return runner.run(_built(name)[0], str(workdir), progress=False)
        finally:
            plan.update(after_step=None, after_checkpoint=None)

    return run


_REFERENCE: dict = {}


@pytest.fixture
def reference(hooks, tmp_path_factory):
    def get(name):
        if name not in _REFERENCE:
            w = tmp_path_factory.mktemp(f"reference-{name}")
            hooks(name, w)
            _REFERENCE[name] = w
        return _REFERENCE[name]
    return get


def _steps(w) -> list[int]:
    d = w / "checkpoints"
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if d.is_dir() else []


def _results(w) -> dict:
    res = json.loads((w / "results.json").read_text())
    for k in PROCESS_FIELDS:
        res["timing"].pop(k)
    return res


def _metrics(w) -> list[dict]:
    with open(w / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("seconds")
    return rows


@functools.lru_cache(maxsize=None)
def _reference_state(w):
    return _final_state(w)


def _final_state(w):
    mngr = ckpt.manager(str(w), read_only=True)
    step = mngr.latest_step()
    state, config, meta = ckpt.read(mngr, step)
    mngr.close()
    return step, state, meta


def _assert_same_state(w, ref):
    step, state, meta = _final_state(w)
    ref_step, ref_state, ref_meta = _reference_state(ref)
    assert step == ref_step
    a = jax.tree_util.tree_flatten_with_path(state)[0]
    b = jax.tree_util.tree_flatten_with_path(ref_state)[0]
    assert [p for p, _ in a] == [p for p, _ in b]
    differ = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(a, b)
              if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()]
    assert not differ, f"{len(differ)} of {len(a)} arrays differ from the uninterrupted run: {differ}"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(meta["rows"]) == strip(ref_meta["rows"])
    assert meta["steps"] == ref_meta["steps"] and meta["tasks_done"] == ref_meta["tasks_done"] == TASKS
    assert meta.get("task_records") == ref_meta.get("task_records")


@pytest.mark.parametrize("kill", KILLS, ids=[f"{k.replace(' ', '-')}-{g}" for k, g in KILLS])
@pytest.mark.parametrize("name", METHODS)
def test_a_run_stopped_at_any_step_and_resumed_ends_as_the_uninterrupted_run(name, kill, hooks, reference,
                                                                              tmp_path):
    ref = reference(name)
    assert json.loads((ref / "results.json").read_text())["timing"]["steps"] == TASKS * TASK_STEPS
    w = tmp_path / "w"
    where, g = kill
    with pytest.raises(Stop):
        hooks(name, w, **{where.replace(" ", "_"): g})
    # the kill landed where it claims: the newest checkpoint is the last one written before it
    before = [s for s in CHECKPOINT_STEPS if (s < g if where == "after step" else s <= g)]
    assert _steps(w)[-1:] == before[-1:]
    assert not (w / "results.json").exists()
    if g == TASKS * TASK_STEPS and where == "after checkpoint":  # killed while the result files were written
        (w / "results.json").write_text('{"method": ')
        (w / "metrics.csv").write_text("task,epoch,loss,sec")
    hooks(name, w)
    assert _results(w) == _results(ref)
    assert {"loss", "ce", "lr", "grad_norm"} <= set(_metrics(ref)[0])  # the comparison covers every term
    assert _metrics(w) == _metrics(ref)
    _assert_same_state(w, ref)
    assert _steps(w) == _steps(ref)


def test_a_protocol_run_stopped_at_any_step_or_checkpoint_and_resumed_ends_as_the_uninterrupted_run(
        hooks, tmp_path_factory):
    ref = tmp_path_factory.mktemp("reference-protocol")
    hooks(PROTOCOL, ref)
    written = list(_built(PROTOCOL)[3]["saved"])  # every checkpoint the uninterrupted run wrote
    res = json.loads((ref / "results.json").read_text())
    runs = res["task_training"]
    # the features do something here: a task stops early, and a best epoch is not the last one run
    assert any(r["stopped"] != "epochs" and r["epochs"] < PROTOCOL_EPOCHS for r in runs), runs
    assert any(r["best_epoch"] < r["epochs"] - 1 for r in runs), runs
    total = res["timing"]["steps"]
    assert total == sum(r["epochs"] for r in runs) * PER_EPOCH
    assert any(s % PER_EPOCH for s in written) and any(s % PER_EPOCH == 0 for s in written[:-1])
    assert len(set(written)) == len(written)  # a task that stops early writes no in-task checkpoint at its end
    rows = _metrics(ref)
    assert {"val_loss", "val_acc", "lr"} <= set(rows[0]) and len({r["lr"] for r in rows}) > 1
    kills = [("after_step", g) for g in range(1, total + 1)] + [("after_checkpoint", g) for g in written]
    for where, g in kills:
        w = tmp_path_factory.mktemp(f"protocol-{where}-{g}")
        with pytest.raises(Stop):
            hooks(PROTOCOL, w, **{where: g})
        hooks(PROTOCOL, w)
        assert _results(w) == _results(ref), (where, g)
        assert _metrics(w) == _metrics(ref), (where, g)
        _assert_same_state(w, ref)
        assert _steps(w) == _steps(ref), (where, g)
