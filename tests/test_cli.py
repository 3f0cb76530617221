import json
import os
import subprocess
import sys

import pytest

from clax.cli import main


def test_run_writes_results_json_metrics_csv_and_heatmap(tmp_path, capsys):
    w = tmp_path / "w"
    assert main(["run", "--method", "finetune", "--benchmark", "split-digits", "--scenario", "cil",
                 "--epochs", "1", "--workdir", str(w), "--quiet"]) == 0
    res = json.loads((w / "results.json").read_text())
    for k in ("method", "benchmark", "scenario", "seed", "num_tasks", "accuracy_matrix", "acc", "bwt", "fwt",
              "forgetting", "params", "timing", "config"):
        assert k in res, k
    assert len(res["accuracy_matrix"]) == 5 and all(len(r) == 5 for r in res["accuracy_matrix"])
    assert res["accuracy_matrix"][0][3] is None  # not evaluable -> null
    assert {"backbone", "per_task"} <= set(res["params"]) and {"train_s", "steps", "compiles"} <= set(res["timing"])
    rows = (w / "metrics.csv").read_text().strip().splitlines()
    assert rows[0] == "task,epoch,loss,ce,lr,grad_norm,seconds" and len(rows) == 1 + 5
    assert (w / "accuracy_matrix.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "ACC" in out and "after\\on" in out


@pytest.mark.parametrize("argv, needle", [
    (["run", "--method", "nope"], "unknown method 'nope'; valid: "),
    (["run", "--benchmark", "nope"], "unknown benchmark 'nope'; valid: "),
    (["run", "--method", "ewc", "--set", "ewc.lamda=3"], "unknown --set key 'ewc.lamda'"),
    (["run", "--method", "ewc", "--set", "train.lr=fast"], "bad value for train.lr: 'fast'"),
    (["run", "--method", "ewc", "--set", "noequals"], "--set expects key=value"),
    (["run", "--method", "ewc", "--scenario", "dil"], "unknown scenario 'dil'"),
    (["run", "--method", "wsn+replay", "--scenario", "cil"], "wsn (in 'wsn+replay') supports til only"),
    (["run", "--method", "wsn+ibm"], "wsn and ibm both own the network"),
    (["run", "--method", "replay+lwf", "--set", "lwf.nosuch=1"], "unknown --set key 'lwf.nosuch'"),
    (["run", "--method", "replay+nope"], "unknown method 'nope' in 'replay+nope'"),
])
def test_user_errors_print_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err


def test_run_joins_methods_with_plus_and_sets_each_parts_settings(tmp_path, capsys):
    w = tmp_path / "j"
    assert main(["run", "--method", "replay+lwf", "--scenario", "cil", "--epochs", "1", "--workdir", str(w),
                 "--quiet", "--set", "lwf.alpha=0.5", "--set", "replay.buffer_size=50"]) == 0
    res = json.loads((w / "results.json").read_text())
    assert res["method"] == "replay+lwf" and res["scenario"] == "cil"
    assert res["config"]["lwf"]["alpha"] == 0.5 and res["config"]["replay"]["buffer_size"] == 50
    header = (w / "metrics.csv").read_text().splitlines()[0]
    assert header == "task,epoch,loss,ce,kd,replay,lr,grad_norm,seconds"


def test_the_installed_command_exits_2_without_a_traceback():
    p = subprocess.run([sys.executable, "-m", "clax.cli", "run", "--method", "nope"], capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()  # one line, whatever methods are registered
    assert len(lines) == 1 and lines[0].startswith("clax: error: unknown method 'nope'; valid: ") and "ewc" in lines[0]


def test_list_names_methods_benchmarks_and_backbones(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("finetune", "replay", "split-digits", "permuted-digits", "resnet18", "vit"):
        assert name in out
