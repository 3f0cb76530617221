import json

import jax
import numpy as np

from clax import checkpoint as ckpt
from clax.cli import main


def _meta(w, step):
    return json.loads((w / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def test_every_task_end_checkpoint_is_kept_with_its_task_and_inspect_task_reads_it(tmp_path, capsys):
    w = tmp_path / "w"
    # checkpoint.keep=2 (the default) rolls only the checkpoints inside tasks (2 of them per task here)
    assert main(["run", "--method", "replay", "--scenario", "til", "--epochs", "1", "--workdir", str(w),
                 "--quiet", "--set", "checkpoint.every_steps=4"]) == 0
    steps = sorted(ckpt.manager(str(w), read_only=True).all_steps())
    metas = {s: _meta(w, s) for s in steps}
    ends = [s for s in steps if metas[s]["task_end"]]
    assert [metas[s]["task"] for s in ends] == [0, 1, 2, 3, 4]  # every task's, with its task index
    inside = [s for s in steps if not metas[s]["task_end"]]
    assert len(inside) == 2 and all(metas[s]["task"] == 4 and metas[s]["task_step"] > 0 for s in inside)
    assert all(ends[3] < s < ends[4] for s in inside)  # of the 10 written, the newest two (in task 4)
    assert ckpt.task_checkpoints(str(w)) == dict(enumerate(ends))
    state, cfg = ckpt.restore_raw(str(w))
    assert cfg["method"] == "replay" and int(state["task"]) == 4
    cl = state["train_state"]["cl"]
    assert set(cl) == {"frozen", "shared", "per_task", "state", "extra"}
    assert cl["per_task"]["head"]["kernel"].shape == (5, 256, 2)
    assert int(cl["extra"]["replay"]["seen"]) > 1000
    A = state["accuracy_matrix"]
    assert A.shape == (5, 5) and np.isfinite(A[4]).all()
    # task 1's own checkpoint: the state after task 1, as the run saw it then
    step, one, _, meta = ckpt.task_checkpoint(str(w), 1)
    assert step == ends[1] and meta["tasks_done"] == 2 and int(one["task"]) == 1
    np.testing.assert_array_equal(one["accuracy_matrix"][:2], A[:2])
    assert np.isnan(one["accuracy_matrix"][2:]).all()
    assert ckpt.task_checkpoint(str(w), 5) is None
    capsys.readouterr()
    assert main(["inspect", str(w), "--task", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["step"] == ends[1] and d["tasks_done"] == 2 and d["task"] == 1


# --- refusals: a truncated checkpoint, a changed config, a NaN loss (issue 7) ---------------------------

import os  # noqa: E402

import pytest  # noqa: E402

RUN = ["run", "--method", "finetune", "--scenario", "til", "--epochs", "1", "--quiet",
       "--set", "checkpoint.every_steps=4", "--set", "checkpoint.keep=3"]


def _steps(w):
    return sorted(int(d) for d in os.listdir(w / "checkpoints") if d.isdigit())


def _results(w):
    res = json.loads((w / "results.json").read_text())
    res.pop("timing")
    return res


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    w = tmp_path_factory.mktemp("ckpt") / "w"
    assert main(RUN + ["--workdir", str(w)]) == 0
    return w


def test_a_truncated_checkpoint_is_named_set_aside_and_the_run_falls_back_to_the_last_intact_one(
        finished, tmp_path, capsys):
    import shutil
    w = tmp_path / "w"
    shutil.copytree(finished, w)
    steps = _steps(w)
    latest, previous = steps[-1], steps[-2]
    files = [os.path.join(r, f) for r, _, fs in os.walk(w / "checkpoints" / str(latest) / "state") for f in fs]
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
    capsys.readouterr()
    assert main(RUN + ["--workdir", str(w)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint step {latest} in {w / 'checkpoints'} is unreadable" in err, err
    assert f"falling back to step {previous}" in err and f"from checkpoint step {previous}" in err, err
    assert "Traceback" not in err
    # nothing deleted: the damaged checkpoint was moved aside, and training rewrote that step
    assert (w / "checkpoints.corrupt" / str(latest) / "state").is_dir()
    assert _steps(w)[-1] == latest
    # the steps after the fallback were retrained and the results are those of the intact run
    assert _results(w) == _results(finished)


def test_a_flipped_byte_never_restores_silently_different_arrays(finished, tmp_path):
    """Orbax does not notice every flipped byte of a data file; the recorded CRC-32 does."""
    import shutil
    w = tmp_path / "w"
    shutil.copytree(finished, w)
    latest = _steps(w)[-1]
    good = ckpt.read(ckpt.manager(str(w), read_only=True), latest)[0]
    files = [os.path.join(r, f) for r, _, fs in os.walk(w / "checkpoints" / str(latest) / "state") for f in fs]
    biggest = max(files, key=os.path.getsize)
    n, caught_by_checksum = os.path.getsize(biggest), 0
    for off in range(n // 8, n, n // 8):
        with open(biggest, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x10]))
        try:
            item = ckpt.read(ckpt.manager(str(w), read_only=True), latest)[0]
            jax.tree.map(np.testing.assert_array_equal, item, good)  # read: then it must be the same
        except ValueError as e:
            caught_by_checksum += "checksum" in str(e)
        with open(biggest, "r+b") as f:
            f.seek(off)
            f.write(b)
    assert caught_by_checksum >= 1


def test_a_changed_config_is_refused_naming_the_keys_and_fresh_moves_the_old_run_aside(finished, tmp_path, capsys):
    import shutil
    w = tmp_path / "w"
    shutil.copytree(finished, w)
    before = {p: os.path.getmtime(p) for p in map(str, (w / "checkpoints").rglob("*"))}
    capsys.readouterr()
    argv = RUN + ["--workdir", str(w), "--set", "train.lr=0.01", "--set", "backbone.hidden=[128,128]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "holds a run with a different config" in err
    assert "train.lr: saved 0.001, now 0.01" in err and "backbone.hidden: saved [256, 256], now [128, 128]" in err
    assert "--fresh" in err
    assert {p: os.path.getmtime(p) for p in map(str, (w / "checkpoints").rglob("*"))} == before  # untouched
    assert main(argv + ["--fresh"]) == 0
    assert "moved the previous run to" in capsys.readouterr().err
    old = tmp_path / "w.old-1"
    assert _results(old) == _results(finished)  # the old run is kept whole
    assert json.loads((w / "results.json").read_text())["config"]["train"]["lr"] == 0.01


def test_a_nan_loss_stops_the_run_naming_task_and_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    w = tmp_path / "w"
    # plain SGD at lr 100 diverges a few steps into task 0, after the checkpoints at steps 3 and 6
    argv = ["run", "--method", "finetune", "--epochs", "2", "--quiet", "--workdir", str(w),
            "--set", "train.optimizer=sgd", "--set", "train.lr=100", "--set", "checkpoint.every_steps=3"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("clax: error: non-finite loss") and "in task 0" in err and "step " in err
    good = _steps(w)[-1]
    assert f"the last good checkpoint (step {good}) is kept in {w / 'checkpoints'}" in err
    assert not (w / "results.json").exists()
    state, _, meta = ckpt.read(ckpt.manager(str(w), read_only=True), good)
    bad_step = int(err.split(" of the task")[0].rsplit("step ", 1)[1])
    assert meta["tasks_done"] == 0 and 0 < meta["task_step"] <= bad_step
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["train_state"]["cl"]))
