"""TensorBoard event files (clax.tracking), Weights & Biases on request, the compilation cache (clax.cache)
and ``clax plot`` (clax.plot), read back as a user would: the event files with TensorBoard's own reader."""
import csv
import importlib.machinery
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from clax import plot, tracking
from clax.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(path):
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def _series(ea, tag):
    return [(e.step, e.value) for e in ea.Scalars(tag)]


@pytest.fixture(scope="module")
def pah_run(tmp_path_factory):
    """A finished one-epoch pah run (named loss terms ce and kd, prototypes) with eval.every_epoch."""
    w = tmp_path_factory.mktemp("tb") / "pah"
    assert main(["run", "--method", "pah", "--epochs", "1", "--workdir", str(w), "--quiet",
                 "--set", "eval.every_epoch=true"]) == 0
    return w


def test_event_file_of_a_finished_run_holds_loss_terms_accuracy_matrix_figures_and_config(pah_run):
    res = json.loads((pah_run / "results.json").read_text())
    with open(pah_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    ea = _events(pah_run / "tb")
    tags = ea.Tags()
    for tag in ("loss/total", "loss/ce", "loss/kd", "opt/lr", "opt/grad_norm", "speed/images_per_s",
                "speed/step_ms", "acc/ACC", "epoch_acc/mean", "final/ACC", "final/BWT", "final/forgetting",
                *(f"acc/task_{c}" for c in range(5)), *(f"epoch_acc/task_{c}" for c in range(5))):
        assert tag in tags["scalars"], tag
    # one point per metrics.csv row, at increasing global steps, with the row's values
    ce = _series(ea, "loss/ce")
    assert len(ce) == len(rows) == 5 and [s for s, _ in ce] == sorted({s for s, _ in ce})
    assert ce[-1][0] == res["timing"]["steps"]
    np.testing.assert_allclose([v for _, v in ce], [float(r["ce"]) for r in rows], rtol=1e-6)
    assert all(v > 0 for _, v in _series(ea, "speed/images_per_s"))
    # the accuracy matrix as it fills: acc/task_c from task c on, ACC = mean of the row's seen tasks
    A = np.array([[np.nan if v is None else v for v in r] for r in res["accuracy_matrix"]])
    for c in range(5):
        assert [v for _, v in _series(ea, f"acc/task_{c}")] == pytest.approx(list(A[c:, c]), abs=1e-6)
    assert [v for _, v in _series(ea, "acc/ACC")] == pytest.approx([np.mean(A[r, :r + 1]) for r in range(5)])
    assert _series(ea, "final/ACC")[0][1] == pytest.approx(res["acc"])
    # one epoch per task: the end-of-epoch accuracy is the end-of-task one (pah's end_task keeps its state)
    assert [v for _, v in _series(ea, "epoch_acc/mean")] == pytest.approx([v for _, v in _series(ea, "acc/ACC")])
    assert {"figures/accuracy_matrix", "figures/prototypes"} <= set(tags["images"])
    assert ea.Images("figures/prototypes")[0].height > 100
    assert any(t.startswith("config") for t in tags["tensors"])
    hp = _events(pah_run / "tb" / "hparams")
    assert _series(hp, "hparam/ACC")[0][1] == pytest.approx(res["acc"])
    # the observability settings are recorded in results.json but not in the checkpoints' config
    assert res["config"]["eval"] == {"every_epoch": True}


class _FakeWandb(types.ModuleType):
    """Stands in for ``wandb``: records init and log calls."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logged = [], []
        self.util = types.SimpleNamespace(generate_id=lambda: "run123")
        self.Image = lambda img: ("image", img.size)
        fake = self

        class Run:
            summary = {}

            def log(self, values, step):
                fake.logged.append((step, dict(values)))

            def finish(self):
                pass

        self.run = Run()

    def init(self, **kw):
        self.inits.append(kw)
        return self.run


def test_resumed_run_writes_each_row_once_and_wandb_gets_the_same_scalars(tmp_path, monkeypatch):
    """A run stopped after the first epoch row of task 2 (its last checkpoint: the end of task 1) and
    resumed shows, in TensorBoard, the uninterrupted run's loss series: no row twice, none lost. The
    resumed run asks for epoch-end evaluation: observability settings do not refuse a resume."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = ["run", "--method", "finetune", "--epochs", "2", "--quiet"]
    ref = tmp_path / "ref"
    assert main(args + ["--workdir", str(ref), "--set", "log.wandb=proj"]) == 0
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["id"] == "run123"
    logged = {k for _, vals in fake.logged for k in vals}
    assert {"loss/ce", "acc/ACC", "opt/grad_norm", "figures/accuracy_matrix"} <= logged

    w = tmp_path / "killed"
    real = tracking.Tracker.epoch_end

    def stop_in_task_2(self, task, epoch, ts):
        real(self, task, epoch, ts)
        if task == 2:  # written and flushed after the last checkpoint: the resume must hide it
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.Tracker, "epoch_end", stop_in_task_2)
    assert main(args + ["--workdir", str(w)]) == 130
    monkeypatch.setattr(tracking.Tracker, "epoch_end", real)
    assert main(args + ["--workdir", str(w), "--set", "eval.every_epoch=true"]) == 0
    assert len([f for f in os.listdir(w / "tb") if f.startswith("events.")]) == 2
    a, b = _events(ref / "tb"), _events(w / "tb")
    for tag in ("loss/ce", "loss/total", "opt/grad_norm", "acc/task_0", "acc/ACC"):
        ra, rb = _series(a, tag), _series(b, tag)
        assert [s for s, _ in rb] == [s for s, _ in ra], tag
        np.testing.assert_allclose([v for _, v in rb], [v for _, v in ra], rtol=1e-6)
    assert [s for s, _ in _series(b, "epoch_acc/mean")] == [s for s, _ in _series(a, "loss/ce")][4:]


def test_wandb_asked_but_not_installed_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    w = tmp_path / "w"
    assert main(["run", "--method", "finetune", "--workdir", str(w), "--set", "log.wandb=proj"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "log.wandb=proj needs Weights & Biases" in err and "pip install wandb" in err
    assert not w.exists()


def test_bad_observability_settings_are_refused_naming_them(tmp_path, capsys):
    assert main(["run", "--method", "finetune", "--workdir", str(tmp_path / "w"),
                 "--set", "eval.every_epoch=maybe"]) == 2
    assert "eval.every_epoch" in capsys.readouterr().err


def test_compilation_cache_in_the_user_cache_dir_and_off_by_setting(tmp_path):
    """In a fresh process: cache.xla=false sets nothing up; the default puts compiled programs under
    $XDG_CACHE_HOME/clax/xla."""
    code = """
import os, jax, jax.numpy as jnp
from clax import cache
assert cache.from_config({"cache": {"xla": False}}) is None and not jax.config.jax_compilation_cache_dir
d = cache.from_config({})
assert d == os.path.join(os.environ["XDG_CACHE_HOME"], "clax", "xla"), d
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
print(len(os.listdir(d)))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "CLAX_XLA"))}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 1


def test_a_cache_dir_already_set_is_kept():
    from clax import cache

    before = jax.config.jax_compilation_cache_dir  # the test suite's own (tests/conftest.py)
    assert before and cache.enable(str(os.path.join(before, "elsewhere"))) == before
    assert jax.config.jax_compilation_cache_dir == before


def test_clax_plot_draws_every_figure_reads_only_and_names_the_files(pah_run, tmp_path, capsys):
    iso = tmp_path / "runs"
    for i, (m, used) in enumerate((("wsn", [0.5, 0.6]), ("packnet", [0.5, 0.75]))):
        d = iso / m
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "method": m, "benchmark": "split-digits", "scenario": "til", "acc": 0.9, "bwt": 0.0,
            "accuracy_matrix": [[0.9, None], [0.9, 0.9 + i / 20]], "capacity_used": used,
            "mask_density": [0.5, 0.5 if m == "wsn" else 0.75]}))
    before = {p: os.stat(p).st_mtime_ns for d in (pah_run, iso) for p, _, _ in os.walk(d)}
    out = tmp_path / "figs"
    assert main(["plot", str(pah_run), str(iso), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(os.path.basename(p) for p in printed)
    assert names == sorted(["pah-accuracy_matrix.png", "wsn-accuracy_matrix.png", "packnet-accuracy_matrix.png",
                            "acc_per_task.png", "capacity.png", "pah-prototypes.png"])
    for p in printed:
        assert os.path.dirname(p) == str(out) and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert before == {p: os.stat(p).st_mtime_ns for d in (pah_run, iso) for p, _, _ in os.walk(d)}
    # a folder with no finished run is one line, exit 2
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_prototype_labels_are_the_tasks_classes():
    from clax.data import split_digits

    bench = split_digits(seed=0)
    labels = plot.task_labels(bench)
    assert [len(r) for r in labels] == [2] * 5
    assert len(set(sum(labels, []))) == 10  # every class once
    fig = plot.prototypes_figure(np.zeros((5, 2, 10, 10, 1)), labels)
    assert [ax.get_title() for ax in fig.axes[:2]] == labels[0]
    flat = plot.prototypes_figure(np.zeros((5, 2, 300)), labels)  # PAH's table: flat 10x10x3 images
    assert flat.axes[0].get_images()[0].get_array().shape == (10, 10, 3)


def test_line_styles_differ_for_many_runs():
    styles = [plot.line_style(i) for i in range(40)]
    keys = {(tuple(s["color"]), s["marker"], s["linestyle"]) for s in styles}
    assert len(keys) == 40
