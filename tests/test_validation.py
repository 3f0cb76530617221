"""Bad values and bad workdirs are refused before anything is written or moved (issue 12, items 5 and 6):
one line naming the key, exit 2, the existing workdir byte for byte as it was, also under ``--fresh``;
the API (TrainConfig, method factories, backbones, Benchmark.from_arrays, image folders) raises
ValueError naming the setting or the file."""
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from battery import snapshot
from clax.cli import main
from clax.config import ConfigError, default_config, apply_overrides, validate
from clax.data import Benchmark
from clax.data.folder import FileReader, image_folder
from clax.methods import ewc, get_method, ibm, lwf, packnet, replay, wsn
from clax.models import get_backbone
from clax.train import TrainConfig, make_context

RUN = ["run", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished finetune run: the good workdir that no refused value may touch."""
    w = tmp_path_factory.mktemp("valid") / "w"
    assert main([*RUN, "--method", "finetune", "--workdir", str(w)]) == 0
    return w


BAD = [  # (method, arguments, the key the one-line message names)
    ("finetune", ["--set", "train.lr=-1"], "train.lr"),
    ("finetune", ["--set", "train.lr=nan"], "train.lr"),
    ("finetune", ["--set", "train.clip=-1"], "train.clip"),
    ("finetune", ["--set", "train.weight_decay=-5"], "train.weight_decay"),
    ("finetune", ["--set", "train.batch_size=0"], "train.batch_size"),
    ("finetune", ["--set", "train.eval_batch_size=0"], "train.eval_batch_size"),
    ("finetune", ["--set", "train.epochs=0"], "train.epochs"),
    ("finetune", ["--set", "train.momentum=inf"], "train.momentum"),
    ("finetune", ["--set", "checkpoint.keep=0"], "checkpoint.keep"),
    ("finetune", ["--set", "checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    ("finetune", ["--set", "backbone.hidden=0"], "backbone.hidden"),
    ("finetune", ["--seed", "-1"], "seed"),
    ("replay", ["--set", "replay.buffer_size=0"], "replay.buffer_size"),
    ("ewc", ["--set", "ewc.lambda=inf"], "ewc.lambda"),
    ("ewc", ["--set", "ewc.lambda=-1"], "ewc.lambda"),
    ("lwf", ["--set", "lwf.temperature=0"], "lwf.temperature"),
    ("hnet", ["--set", "hnet.hidden=[8,0]"], "hnet.hidden"),
    ("clr", ["--set", "backbone.nf=0"], "backbone.nf"),
    ("clr", ["--set", "clr.kernel_size=2"], "clr.kernel_size"),
    ("soft_tf", ["--set", "backbone.dim=30"], "backbone.dim"),
    ("wsn", ["--set", "wsn.layers=nowhere"], "wsn.layers='nowhere'"),  # found when the state is built (dry)
]


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "fresh"])
@pytest.mark.parametrize("method, args, key", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_a_refused_value_exits_2_naming_the_key_and_leaves_the_workdir_unchanged(finished, capsys, method, args,
                                                                                   key, fresh):
    capsys.readouterr()
    before = snapshot(finished.parent)  # the workdir and its siblings (no WORKDIR.old-N may appear)
    argv = [*RUN, "--method", method, "--workdir", str(finished), *args] + (["--fresh"] if fresh else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clax: error: ") and err.count("\n") == 1 and key in err, err
    assert "Traceback" not in err
    assert snapshot(finished.parent) == before


def test_the_command_refuses_a_bad_value_under_fresh_with_one_line_and_exit_2(finished):
    before = snapshot(finished.parent)
    p = subprocess.run([sys.executable, "-m", "clax.cli", *RUN, "--method", "finetune", "--workdir", str(finished),
                        "--fresh", "--set", "checkpoint.keep=0"], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["clax: error: checkpoint.keep must be >= 1, got 0"]
    assert snapshot(finished.parent) == before


def test_bad_workdirs_are_one_line_errors_and_change_nothing(finished, tmp_path, capsys, monkeypatch):
    f = tmp_path / "a-file"
    f.write_text("mine")
    cases = [(str(f), [], "is a file, not a directory"),
             (str(f / "sub"), [], "is a file, not a directory"),
             (str(tmp_path / ("x" * 300)), [], "the file system allows")]
    for workdir, extra, needle in cases:
        capsys.readouterr()
        assert main([*RUN, "--method", "finetune", "--workdir", workdir, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and workdir[:40] in err, err
    assert f.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["a-file"]
    # `.` with --fresh would move the current directory's contents aside: refused
    before = snapshot(finished.parent)
    monkeypatch.chdir(finished)
    assert main([*RUN, "--method", "finetune", "--workdir", ".", "--fresh"]) == 2
    assert "current directory" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert snapshot(finished.parent) == before
    # a folder that cannot be written (root can write anywhere, so there the permission is faked)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m, **kw: False if os.fspath(p) == str(ro) else real(p, m))
        assert main([*RUN, "--method", "finetune", "--workdir", str(ro / "w")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not writable" in err and str(ro) in err
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("kwargs, needle", [
    ({"epochs": 0}, "train.epochs must be >= 1, got 0"),
    ({"epochs": 1.5}, "train.epochs must be an integer, got 1.5"),
    ({"lr": -1.0}, "train.lr must be > 0"),
    ({"lr": math.inf}, "train.lr must be a finite number"),
    ({"clip": -1.0}, "train.clip must be >= 0"),
    ({"weight_decay": -5.0}, "train.weight_decay must be >= 0"),
    ({"batch_size": 0}, "train.batch_size must be >= 1"),
    ({"optimizer": "adagrad"}, "train.optimizer must be one of adam, adamw, sgd"),
    ({"lr_schedule": "step:2:-1"}, "train.lr_schedule 'step:2:-1'"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_train_config_refuses_bad_values_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def ctx():
    """A tiny stream's context (no data is trained on)."""
    x = np.random.default_rng(0).random((8, 4), np.float32)
    bench = Benchmark.from_arrays("tiny", x, np.arange(8) % 4, x, np.arange(8) % 4, [[0, 1], [2, 3]])
    return make_context(get_backbone("mlp", (4,), hidden=[4]), bench, "til")


@pytest.mark.parametrize("factory, kwargs, needle", [
    (replay, {"buffer_size": 2.5}, "replay.buffer_size must be an integer, got 2.5"),
    (replay, {"buffer_size": 0}, "replay.buffer_size must be >= 1, got 0"),
    (ewc, {"lambda": math.nan}, "ewc.lambda must be a finite number, got nan"),
    (ewc, {"fisher_samples": "many"}, "ewc.fisher_samples must be an integer"),
    (lwf, {"temperature": 0.0}, "lwf.temperature must be > 0"),
    (wsn, {"c": "half"}, "wsn.c must be a finite number"),
    (wsn, {"layers": "("}, "wsn.layers must be a regular expression"),
    (ibm, {"kl_per_sample": "yes"}, "ibm.kl_per_sample must be true or false"),
    (packnet, {"prune_after": 2.0}, "packnet.prune_after must be an integer, got 2.0"),
    (packnet, {"sparsity": 0.5}, "packnet has no setting 'sparsity'"),
])
def test_method_factories_refuse_wrong_types_and_ranges_naming_the_setting(ctx, factory, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        factory(ctx, **kwargs)


def test_get_method_backbones_and_validate_name_the_setting(ctx):
    with pytest.raises(ValueError, match=r"hnet\.hidden must be a list of integers >= 1, got \[8, 0\]"):
        get_method("hnet", ctx, hidden=[8, 0])
    with pytest.raises(ValueError, match=r"backbone\.hidden must be a list of integers >= 1, got \[0\]"):
        get_backbone("mlp", (4,), hidden=[0])
    with pytest.raises(ValueError, match=r"backbone\.nf must be >= 1, got 0"):
        get_backbone("resnet18", (8, 8, 3), nf=0)
    cfg = apply_overrides(default_config("clr"), ["clr.pretrain_steps=0"])
    with pytest.raises(ConfigError, match=r"clr\.pretrain_steps must be >= 1, got 0"):
        validate(cfg)
    validate(default_config("soft_tf"))  # the defaults pass
    with pytest.raises(ConfigError, match=r"checkpoint\.keep must be >= 1"):
        validate({**default_config(), "checkpoint": {"every_steps": 0, "keep": 0}})


def test_from_arrays_refuses_an_empty_task_and_labels_in_no_task():
    x = np.zeros((8, 3), np.float32)
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="task 1 of class_order has no classes"):
        Benchmark.from_arrays("b", x, y, x, y, [[0, 1, 2, 3], []])
    with pytest.raises(ValueError, match=r"task 2 \(classes \[4\]\) has no training samples"):
        Benchmark.from_arrays("b", x, y, x, y, [[0, 1], [2, 3], [4]])
    with pytest.raises(ValueError, match=r"task 1 \(classes \[2, 3\]\) has no test samples"):
        Benchmark.from_arrays("b", x, y, x[:2], y[:2], [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="label 2 in y_train belongs to no task of class_order"):
        Benchmark.from_arrays("b", x, y, x[:2], y[:2], [[0, 1]])


def _image_folder(root, bad: str):
    """``root/{train,test}/{a,b}/{0,1}.png``, 8x8; ``bad`` (a relative path) truncated."""
    for split in ("train", "test"):
        for c, name in enumerate("ab"):
            os.makedirs(root / split / name)
            for i in range(2):
                Image.new("RGB", (8, 8), (60 * c + 20 * i,) * 3).save(root / split / name / f"{i}.png")
    data = (root / bad).read_bytes()
    (root / bad).write_bytes(data[: len(data) // 2])
    return root


def test_a_corrupt_image_is_named(tmp_path, capsys):
    root = _image_folder(tmp_path / "d1", "train/b/1.png")
    bench = image_folder(data_dir=str(root), num_tasks=1, augment=False, workers=1)
    x = bench.tasks[0].x_train
    with pytest.raises(ValueError, match=r"cannot read image .*train/b/1\.png"):
        x[np.arange(len(x))]
    with pytest.raises(ValueError, match=r"cannot read image .*not-an-image\.png"):
        (tmp_path / "not-an-image.png").write_text("hello")
        FileReader([str(tmp_path / "not-an-image.png")])([0])
    # the first training image is read while the benchmark is built: the command names it, one line
    root = _image_folder(tmp_path / "d2", "train/a/0.png")
    assert main([*RUN, "--method", "finetune", "--benchmark", "image-folder", "--data-dir", str(root),
                 "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read image" in err and os.path.join("train", "a", "0.png") in err


def test_the_divergence_message_starts_on_its_own_line(tmp_path, capsys):
    """A NaN loss found at an in-task checkpoint, while the progress bar is drawn: the bar is closed
    and the message starts a line."""
    assert main(["run", "--method", "finetune", "--epochs", "2", "--workdir", str(tmp_path / "w"),
                 "--set", "train.optimizer=sgd", "--set", "train.lr=1000", "--set", "checkpoint.every_steps=5"]) == 3
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert any(line.startswith("clax: error: non-finite loss") for line in lines), repr(err[-300:])


def test_the_host_finite_check_agrees_with_the_compiled_one():
    """``_all_finite_host`` (single-process CPU runs) reads what ``_all_finite`` reads: the shared
    partition and row ``t`` of the per-task one, inexact leaves only."""
    from clax.partition import CLState
    from clax.train import _all_finite, _all_finite_host

    def state(shared_w=1.0, row1=1.0, row0_bf16=1.0, frozen=1.0):
        per_task = {"w": jnp.ones((3, 4)).at[1, 2].set(row1),
                    "b": jnp.ones((3, 2), jnp.bfloat16).at[0, 1].set(row0_bf16),
                    "n": jnp.zeros((3,), jnp.int32)}
        return CLState(frozen={"backbone": jnp.full((2,), frozen)}, shared={"w": jnp.full((5,), shared_w)},
                       per_task=per_task, state={}, extra={})

    cases = [({}, 0, True), ({"shared_w": jnp.nan}, 2, False), ({"row1": jnp.inf}, 1, False),
             ({"row1": jnp.inf}, 0, True), ({"row0_bf16": -jnp.inf}, 0, False), ({"row0_bf16": jnp.nan}, 2, True),
             ({"frozen": jnp.nan}, 0, True)]  # the frozen partition is not trained
    for kw, t, want in cases:
        cl = state(**kw)
        assert _all_finite_host(cl, t) is want and bool(_all_finite(cl, jnp.int32(t))) is want, (kw, t)
