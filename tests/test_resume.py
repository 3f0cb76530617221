"""A run killed with SIGKILL in the middle of a task and run again ends exactly as an uninterrupted run.

Every field of results.json is compared except ``timing`` (wall-clock seconds and compile counts differ
by nature: the resumed process compiles its steps again) and the config's ``checkpoint`` section (the
reference run does not checkpoint inside tasks, which shows that checkpointing leaves results alone).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clax.cli import main

ARGS = ["run", "--method", "finetune", "--scenario", "til", "--epochs", "2", "--quiet",
        "--set", "backbone.hidden=[512,512]", "--set", "train.batch_size=16"]
# The killed run checkpoints every 4 of a task's 36 steps: a task then lasts about a second (each save
# costs Orbax some 80 ms), so the kill lands inside it. Checkpoint settings do not change results, and
# the reference run writes only the per-task checkpoints.
KILLED = ARGS + ["--set", "checkpoint.every_steps=4", "--set", "checkpoint.keep=3"]


def _results(w):
    """results.json without ``timing`` and without the checkpoint settings (which differ on purpose)."""
    res = json.loads((w / "results.json").read_text())
    res.pop("timing")
    res["config"].pop("checkpoint")
    return res


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    w = tmp_path_factory.mktemp("resume") / "reference"
    assert main(ARGS + ["--workdir", str(w)]) == 0
    return w


def _mid_task_checkpoint(ckdir, min_task: int, max_step: int):
    """The meta of a finished checkpoint inside task ``min_task`` or later, within its first steps."""
    if not ckdir.is_dir():
        return None
    for d in ckdir.iterdir():
        meta = d / "meta" / "metadata"
        if d.name.isdigit() and meta.is_file():
            try:
                m = json.loads(meta.read_text())
            except ValueError:
                continue
            if m["tasks_done"] >= min_task and 0 < m["task_step"] <= max_step:
                return m
    return None


def test_sigkill_in_the_middle_of_a_task_then_the_same_command_ends_as_an_uninterrupted_run(
        uninterrupted, tmp_path, capsys):
    w = tmp_path / "killed"
    argv = KILLED + ["--workdir", str(w)]
    p = subprocess.Popen([sys.executable, "-m", "clax.cli", *argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline, seen = time.monotonic() + 120, None
        while seen is None and p.poll() is None and time.monotonic() < deadline:
            seen = _mid_task_checkpoint(w / "checkpoints", min_task=1, max_step=8)
            time.sleep(0.01)
        assert seen is not None, f"no mid-task checkpoint appeared (rc {p.poll()}): {p.stderr.read()[-2000:]}"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    assert not (w / "results.json").exists()  # it really stopped before the end

    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    # resumed from inside a task (not from a task boundary), at or after the checkpoint seen before the kill
    assert "resuming" in err and "of the task)" in err, err
    step = int(err.split("from checkpoint step ")[1].split()[0])
    assert step >= seen["step"]
    assert _results(w) == _results(uninterrupted)
    ref_rows = (uninterrupted / "metrics.csv").read_text().splitlines()
    rows = (w / "metrics.csv").read_text().splitlines()
    strip = lambda lines: [ln.rsplit(",", 1)[0] for ln in lines]  # drop the seconds column
    assert strip(rows) == strip(ref_rows)  # the per-epoch losses too, including the interrupted epoch


def test_rerunning_a_finished_run_reproduces_its_results_without_training(uninterrupted, capsys):
    before = _results(uninterrupted)
    capsys.readouterr()
    assert main(ARGS + ["--workdir", str(uninterrupted)]) == 0
    err = capsys.readouterr().err
    assert "the finished run" in err
    timing = json.loads((uninterrupted / "results.json").read_text())["timing"]
    assert timing["compiles"] == 0  # nothing was trained or evaluated again
    assert _results(uninterrupted) == before
