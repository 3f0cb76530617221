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
    # FWT is no transfer in CIL: null in results.json, "-" in the table
    assert res["fwt"] is None and res["init_accuracy"] is not None
    head, row = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["method"], ["finetune"])][-2:]
    assert row[head.index("FWT")] == "-" and row[head.index("bytes/task")] == str(
        round(sum(res["params"]["bytes_per_task"]) / 5))


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


def test_the_table_shows_bytes_stored_per_task_and_fwt_dash_where_none():
    from clax.cli import format_table

    res = {"method": "pah", "scenario": "til", "acc": 0.9, "bwt": -0.01, "fwt": None, "forgetting": 0.02,
           "params": {"backbone": 82432, "per_task": [0] * 5, "bytes_per_task": [800] * 5},
           "timing": {"train_s": 3.0}}
    head, row, legend = format_table([res]).splitlines()
    cells = dict(zip(head.split(), row.split()))
    assert cells["bytes/task"] == "800" and cells["FWT"] == "-" and "params/task" not in head
    assert "bytes each task stores" in legend


def _subparsers(parser):
    import argparse

    return {n: sp for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n, sp in a.choices.items()}


def test_every_flag_of_every_command_says_what_it_is_and_its_default(capsys):
    from clax.cli import build_parser

    subs = _subparsers(build_parser())
    assert {"run", "list", "inspect", "eval"} <= set(subs)
    for name, sp in subs.items():
        for a in sp._actions:
            if a.dest == "help":
                continue
            assert a.help and len(a.help) > 15, (name, a.dest)
            if a.option_strings or a.nargs == "?":
                assert "default" in a.help.lower(), (name, a.dest, a.help)
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Default: split-digits" in out and "package.module:function" in out and "til" in out
    for method in ("finetune", "replay", "pah", "soft_tf"):
        assert method in out


def test_list_method_shows_each_setting_with_default_valid_values_and_one_line(capsys):
    from clax.methods import METHODS, setting_help

    for name, spec in METHODS.items():  # every setting of every method has its line
        helps = setting_help(name)
        assert set(helps) == set(spec.defaults), name
        assert all(h and "``" not in h for h in helps.values()), name
    assert main(["list", "pah"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("    ")}
    for key, default in METHODS["pah"].defaults.items():
        assert key in rows, key
        assert setting_help("pah")[key] in rows[key]
    assert rows["kd_direction"].split()[1:4] == ["student_teacher", "teacher_student", "|"]
    assert rows["alpha"].split()[1:4] == ["0.5", "number", ">="]
    assert "epochs=10" in out and "--set pah.KEY=VALUE" in out
    starts = {ln.index(ln.split()[1], len(ln.split()[0]) + 4) for ln in rows.values()}
    assert len(starts) == 1  # the defaults column is aligned
    assert main(["list", "replay+lwf"]) == 0
    out = capsys.readouterr().out
    assert "buffer_size" in out and "temperature" in out
    assert main(["list", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_list_prints_clean_aligned_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "`" not in out and ":func:" not in out and ":class:" not in out
    section, starts = None, {}
    for ln in out.splitlines():
        if not ln.startswith("  "):
            section = ln.split()[0]
            continue
        name = ln.split()[0]
        starts.setdefault(section, set()).add(ln.index(ln.split()[1], len(name) + 2))
    assert set(starts) == {"methods", "benchmarks", "backbones"}
    assert all(len(s) == 1 for s in starts.values()), starts  # each section's second column starts at one place


def test_main_job_schedule_starts_heavy_methods_first_and_keeps_a_methods_runs_together():
    from clax.cli import HEAVY, schedule

    runs = [("finetune", "til"), ("finetune", "cil"), ("ewc", "til"), ("soft_tf", "til"), ("clr", "til"),
            ("soft_tf", "cil"), ("si", "til"), ("si", "cil")]
    got = schedule(runs)
    assert list(got) == ["clr", "soft_tf", "finetune", "si", "ewc"]
    assert got["soft_tf"] == [("soft_tf", "til"), ("soft_tf", "cil")]
    assert sorted(r for g in got.values() for r in g) == sorted(runs)
    assert HEAVY.index("clr") < HEAVY.index("soft_tf")
    # joint compiles finetune's programs: its runs follow finetune's in finetune's worker, whatever the order
    got = schedule([("joint", "til"), ("finetune", "til"), ("ewc", "til"), ("joint", "cil"), ("finetune", "cil")])
    assert got == {"finetune": [("finetune", "til"), ("finetune", "cil"), ("joint", "til"), ("joint", "cil")],
                   "ewc": [("ewc", "til")]}
    assert schedule([("joint", "til")]) == {"joint": [("joint", "til")]}  # alone: its own group


def test_main_job_on_two_worker_processes_equals_one_worker(tmp_path):
    """The parallel main job (spawned workers, each on one core) returns, in the registry's order, the
    results the same runs give one after another in one worker (same accuracy matrices, bit for bit)."""
    from clax.cli import _run_parallel, build_parser

    args = build_parser().parse_args(["run", "--epochs", "1", "--quiet", "--set", "train.epochs=1",
                                      "--set", "log.tensorboard=false"])
    runs = [("finetune", "til"), ("lwf", "cil")]
    par = _run_parallel(args, runs, str(tmp_path / "par"), 2)
    seq = _run_parallel(args, runs, str(tmp_path / "seq"), 1)
    assert [(r["method"], r["scenario"]) for r in par] == runs
    for p, q in zip(par, seq):
        assert p["accuracy_matrix"] == q["accuracy_matrix"]
    assert (tmp_path / "par" / "lwf-cil" / "results.json").exists()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="the platform cannot pin a process to a core")
def test_main_job_workers_each_run_on_one_core_in_turn():
    """pin_worker (the workers' initializer) puts the i-th worker started on the i-th usable core alone,
    round robin; the default worker count is one per usable core, at most MAX_DEFAULT_JOBS."""
    import multiprocessing as mp

    from clax.cli import MAX_DEFAULT_JOBS, default_jobs, pin_worker, usable_cores

    cores = usable_cores()
    assert cores == sorted(os.sched_getaffinity(0))
    assert default_jobs() == max(1, min(MAX_DEFAULT_JOBS, len(cores)))
    import threadpoolctl

    blas = threadpoolctl.threadpool_info()
    before, counter, seen = os.sched_getaffinity(0), mp.Value("i", 0), []
    try:
        for _ in range(len(cores) + 1):
            pin_worker(counter, cores)
            seen.append(os.sched_getaffinity(0))
        pinned_blas = threadpoolctl.threadpool_info()
    finally:
        os.sched_setaffinity(0, before)
        threadpoolctl.threadpool_limits({p["prefix"]: p["num_threads"] for p in blas})
    assert seen == [{c} for c in cores] + [{cores[0]}]
    assert counter.value == len(cores) + 1
    assert pinned_blas and all(p["num_threads"] == 1 for p in pinned_blas)  # numpy's BLAS: one thread too
    assert threadpoolctl.threadpool_info() == blas
