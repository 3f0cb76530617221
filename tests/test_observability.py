"""Honest figures and user benchmarks (issue 16, items 2 and 6).

* ``timing.compiles`` is the number of XLA compilations ``fit`` made, as :mod:`jax.monitoring` counts
  them (the backend-compile event), not the two traced steps (those stay as ``timing.step_traces``);
  the method's init is one jitted compilation.
* ``--benchmark package.module:function`` runs a user's :class:`clax.data.Benchmark` (made with
  ``Benchmark.from_arrays``), stores the reference in the config so that a rerun resumes and
  ``clax inspect`` / ``clax eval`` rebuild it; a reference that does not resolve or does not return a
  Benchmark is one line, exit 2, and the workdir is never created.
"""
import json
import textwrap

import pytest
from jax import monitoring

from battery import tiny_digits
from clax.cli import main
from clax.config import default_config, train_config
from clax.methods import get_method
from clax.metrics import COMPILE_EVENT
from clax.models import get_backbone
from clax.train import fit, make_context


def test_compiles_counts_every_xla_compilation_as_jax_monitoring_does():
    bench = tiny_digits(2)
    cfg = default_config("ewc")
    cfg["train"].update(epochs=1, batch_size=16, eval_batch_size=64)
    ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[24]), bench, "til")
    method = get_method("ewc", ctx, fisher_samples=16)  # a fresh method: its init and steps compile anew
    names = []

    def listen(event, duration, **kw):
        if event == COMPILE_EVENT:
            names.append(kw.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listen)
    try:
        out = fit(method, ctx, bench, train_config(cfg), progress=False)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    t = out["timing"]
    assert t["compiles"] == len(names), (t, names)
    assert t["step_traces"] == 2 and t["traces"] == {"train_step": 1, "eval_step": 1}
    assert t["compiles"] > t["step_traces"] and t["compile_s"] > 0
    # the method's init: two compiled programs (the model's, the transforms'), not its eager operations
    assert names.count("jit(init_model)") == 1 and names.count("jit(init_transforms)") == 1
    assert "jit(train_step)" in names and "jit(eval_step)" in names


USER_MODULE = '''
import numpy as np
from clax.data import Benchmark


def blobs(seed=0, view="flat"):
    """Four Gaussian blobs in 8 dimensions, two tasks of two classes."""
    assert view == "flat"
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 30)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    x[np.arange(120), y] += 4.0
    return Benchmark.from_arrays("blobs", x[::2], y[::2], x[1::2], y[1::2], [[0, 1], [2, 3]])


def not_a_benchmark():
    return 42

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user module ``clax_user_bench`` written to tmp_path and put on sys.path."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "clax_user_bench.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(src))
    return "clax_user_bench"


def test_a_user_benchmark_runs_resumes_and_is_found_by_inspect_and_eval(tmp_path, user_module, capsys):
    w, ref = tmp_path / "w", f"{user_module}:blobs"
    argv = ["run", "--method", "replay", "--benchmark", ref, "--epochs", "1", "--quiet", "--workdir", str(w),
            "--set", "replay.buffer_size=20"]
    assert main(argv) == 0
    res = json.loads((w / "results.json").read_text())
    assert res["benchmark"] == ref and res["config"]["benchmark"] == ref and res["num_tasks"] == 2
    assert res["acc"] > 0.7  # the blobs are separable: the run trained on them
    capsys.readouterr()
    assert main(argv) == 0  # the same command resumes the finished run from its config
    assert "resuming" in capsys.readouterr().err
    assert main(["inspect", str(w), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["benchmark"] == ref and d["tasks_done"] == 2 and d["bytes_per_task"] == res["params"]["bytes_per_task"]
    assert main(["eval", str(w), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["benchmark"] == ref and r["compared"] == [0, 1] and r["matches"]


@pytest.mark.parametrize("fn, needle", [
    ("no_such_module_xyz:blobs", "benchmark 'no_such_module_xyz:blobs': no module named 'no_such_module_xyz'"),
    ("{mod}:nope", "benchmark '{mod}:nope': module {mod} has no function 'nope'"),
    ("{mod}:NOT_CALLABLE", "{mod}.NOT_CALLABLE is a int, not a function"),
    ("{mod}:not_a_benchmark", "benchmark '{mod}:not_a_benchmark' returned a int, not a clax.data.Benchmark"),
    ("{mod}:", "must be a registered name or package.module:function"),
])
def test_a_bad_user_benchmark_is_one_line_exit_2_before_the_workdir_is_touched(tmp_path, user_module, capsys,
                                                                             fn, needle):
    w = tmp_path / "w"
    ref = fn.format(mod=user_module)
    assert main(["run", "--method", "finetune", "--benchmark", ref, "--quiet", "--workdir", str(w)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle.format(mod=user_module) in err, err
    assert not w.exists()
