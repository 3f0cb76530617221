"""Two processes on localhost (jax.distributed, Gloo CPU collectives) train as one run: the same
results as one process, files written once (by process 0), and a kill of both resumed by both.

Each process has one CPU device, so the mesh's data axis spans the two processes and each process
feeds only its half of every global batch.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from test_mesh import ONE, _truncate_to_task

ARGS = ["run", "--method", "replay", "--epochs", "1", "--quiet", "--set", "backbone.hidden=[32]"]
ENV = ONE  # one CPU device per process; the session's compilation cache


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir):
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-m", "clax.cli", *ARGS, "--workdir", str(workdir)],
                              env={**ENV, "CLAX_COORDINATOR": f"localhost:{port}", "CLAX_NUM_PROCESSES": "2",
                                   "CLAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_give_the_one_process_run_and_resume_after_a_kill_of_both(tmp_path):
    two = tmp_path / "two"
    _two_processes(two)
    one = tmp_path / "one"
    p = subprocess.run([sys.executable, "-m", "clax.cli", *ARGS, "--workdir", str(one)], env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a = json.loads((two / "results.json").read_text())
    b = json.loads((one / "results.json").read_text())
    assert a["devices"]["processes"] == 2 and a["devices"]["mesh"] == {"data": 2, "model": 1}
    assert b["devices"]["processes"] == 1
    np.testing.assert_allclose(np.array(a["accuracy_matrix"], float), np.array(b["accuracy_matrix"], float),
                               atol=2 / 70, equal_nan=True)
    # one metrics.csv with one row per task and epoch: written by process 0 only
    assert len((two / "metrics.csv").read_text().strip().splitlines()) == 1 + 5
    # both processes killed after task 1: both resume from the checkpoint they wrote together
    cut = tmp_path / "cut"
    _truncate_to_task(two, cut, 1)
    outs = _two_processes(cut)
    assert any("resuming" in out + err for out, err in outs)
    c = json.loads((cut / "results.json").read_text())
    np.testing.assert_allclose(np.array(c["accuracy_matrix"], float), np.array(a["accuracy_matrix"], float),
                               atol=2 / 70, equal_nan=True)
    assert c["timing"]["steps"] == a["timing"]["steps"]
    shutil.rmtree(tmp_path)
