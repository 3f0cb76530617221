"""CLR: zero forgetting, learning, per-task cost, TIL-only, the checked predict, experiment configs."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from battery import assert_no_recompile_after_first_task, assert_zero_forgetting, quick_config, quick_run
from test_pretrained import as_state_dict, assert_is_checkpoint, file_sha256, save_safetensors
from clax.config import apply_overrides
from clax.data import get_benchmark
from clax.methods import get_method
from clax.methods.frozen import checked_predict
from clax.models import get_backbone
from clax.runner import build
from clax.train import make_context

TINY = ["backbone.nf=4", "clr.pretrained=none", "train.lr=0.01"]  # random frozen backbone: fast
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``(state dict, path)``: a tiny ResNet-18 (nf=4, CIFAR stem) as a torchvision-layout .safetensors,
    its values a random initialisation of another key than clr's own (so ignoring the file shows)."""
    params, stats = get_backbone("resnet18", (32, 32, 3), nf=4).init(jax.random.PRNGKey(7))
    sd = as_state_dict(params, stats)
    return sd, save_safetensors(sd, str(tmp_path_factory.mktemp("ckpt") / "resnet18.safetensors"))


@pytest.fixture(scope="module")
def til(checkpoint):
    """The run the tests below share: its frozen backbone is an imported checkpoint (clr.pretrained at its
    default)."""
    return quick_run("clr", scenario="til", epochs=2, sets=["backbone.nf=4", f"backbone.pretrained={checkpoint[1]}",
                                                             "train.lr=0.01"], num_tasks=3)


def test_zero_forgetting_bit_for_bit(til):
    assert_zero_forgetting(til)
    assert til["fwt"] == 0.0  # an untrained task is evaluated with its untouched initial row


def test_learns_each_task_and_no_recompile(til):
    assert np.mean(np.diag(til["accuracy_matrix"])) > 0.75, til["accuracy_matrix"]
    assert_no_recompile_after_first_task(til)
    assert til["timing"]["traces"] == {"train_step": 1, "eval_step": 1}


def test_pretraining_is_cached_on_disk_and_reloaded(tmp_path):
    from clax import pretrain
    bb = get_backbone("mlp", (64,), hidden=[32])
    p, s, rep = pretrain.pretrained_backbone(bb, "glyphs", steps=400, cache_dir=str(tmp_path))
    assert rep["heldout_accuracy"] > 0.3 and "no digit" in rep["data"]  # 16 classes: chance is 1/16
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".msgpack")
    p2, _ = pretrain.load(str(tmp_path / files[1]), bb)
    jax.tree.map(np.testing.assert_array_equal, p, p2)
    with pytest.raises(ValueError, match="do not fit"):
        pretrain.load(str(tmp_path / files[1]), get_backbone("mlp", (64,), hidden=[16]))


def test_backbone_is_frozen_and_only_task_rows_change(til):
    cl = til["state"].cl
    fresh = til["method"].init(jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, cl.frozen, fresh.frozen)
    k = cl.per_task["reprogram"]["resnet.layer1_0.conv1"]
    assert not np.array_equal(k[0], k[2]) and cl.shared == {}


def test_given_checkpoint_is_frozen_exactly_as_loaded(til, checkpoint):
    """backbone.pretrained=PATH with the default clr.pretrained ("auto"): no glyph pretraining; the run
    trains with the file's values bit for bit and reports the file and its SHA-256."""
    sd, path = checkpoint
    assert til["cfg"]["clr"]["pretrained"] == "auto"
    assert_is_checkpoint(til["state"].cl.frozen["backbone"], sd)  # after the run
    start = til["method"].init(jax.random.PRNGKey(0))  # what fit() starts from: BatchNorm rows from the file
    for t in range(3):
        for part in (start.per_task["bn"], start.state["bn"]):  # {"resnet.layer1_0.bn1": {scale, bias | mean, var}}
            assert_is_checkpoint({k: {n: v[t] for n, v in row.items()} for k, row in part.items()}, sd)
    rep = til["report"]["pretrain"]  # results.json's "pretrain"
    assert rep["source"] == "file" and rep["steps"] == 0
    assert rep["path"] == os.path.abspath(path) and rep["sha256"] == file_sha256(path)
    assert path in rep["data"] and "random" not in rep["data"]


def test_none_without_a_checkpoint_is_reported_as_random_initialisation():
    bench = get_benchmark("split-digits", view="image")
    ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=4), bench, "til")
    meth = get_method("clr", ctx, pretrained="none")
    rep = meth.report(meth.init(jax.random.PRNGKey(0)))["pretrain"]
    assert rep["steps"] == 0 and rep["source"] == "random" and "random initialisation" in rep["data"]
    assert "path" not in rep and "sha256" not in rep


def test_none_with_a_checkpoint_uses_it_and_glyphs_with_one_is_refused(checkpoint, tmp_path, monkeypatch):
    """clr.pretrained=none + a file: the file, frozen as loaded and named in the report; glyphs + a file:
    an error naming both settings. Neither pretrains nor writes anything (what ``clax eval`` rebuilds)."""
    from clax import pretrain

    sd, path = checkpoint

    def no_pretraining(*a, **k):
        raise AssertionError("glyph pretraining ran")

    monkeypatch.setattr(pretrain, "pretrain", no_pretraining)
    pre_dir = tmp_path / "pretrain"
    base = ["backbone.nf=4", f"backbone.pretrained={path}", f"clr.pretrain_dir={pre_dir}"]
    for value in ("none", "auto"):
        _, _, meth = build(quick_config("clr", sets=base + [f"clr.pretrained={value}"]))
        cl = meth.init(jax.random.PRNGKey(0))
        assert_is_checkpoint(cl.frozen["backbone"], sd)
        rep = meth.report(cl)["pretrain"]
        assert rep["sha256"] == file_sha256(path) and rep["path"] == os.path.abspath(path), rep
    assert not pre_dir.exists()
    with pytest.raises(ValueError, match=r"clr\.pretrained='glyphs'.*backbone\.pretrained="):
        build(quick_config("clr", sets=base + ["clr.pretrained=glyphs"]))
    other = tmp_path / "w.msgpack"
    bb = get_backbone("resnet18", (32, 32, 3), nf=4)
    pretrain.save(str(other), *bb.init(jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match=r"clr\.pretrained='.*w\.msgpack'.*backbone\.pretrained="):
        build(quick_config("clr", sets=base + [f"clr.pretrained={other}"]))
    # a clax .msgpack without a backbone checkpoint: loaded as written, named with its SHA-256
    _, _, meth = build(quick_config("clr", sets=["backbone.nf=4", f"clr.pretrained={other}"]))
    cl = meth.init(jax.random.PRNGKey(1))
    want = pretrain.load(str(other), bb)[0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                                            np.asarray(b).view(np.uint32)), cl.frozen["backbone"], want)
    assert meth.report(cl)["pretrain"]["sha256"] == file_sha256(str(other))


def test_clr_is_a_chain_of_the_reprogrammed_model_and_its_transforms(til):
    meth = til["method"]
    assert meth.model.name == "clr" and meth.model.scenarios == ("til",)
    assert [tr.name for tr in meth.transforms] == ["task_batchnorm", "trained", "pretrained"]
    assert set(til["state"].cl.extra) == {"trained"}


def test_predict_for_untrained_task_names_it(til):
    meth, cl, task = til["method"], til["state"].cl, til["bench"].tasks[0]
    logits = checked_predict(meth, cl, task.x_test[:4], np.zeros(4, np.int32))
    assert logits.shape == (4, 2)
    cl2 = cl.replace(extra={**cl.extra, "trained": cl.extra["trained"].at[2].set(False)})
    with pytest.raises(ValueError, match="task id 2 has not been trained"):
        checked_predict(meth, cl2, task.x_test[:4], np.array([0, 2, 0, 0], np.int32))
    with pytest.raises(ValueError, match="task id 2"):  # the eager call checks too
        meth.predict(cl2, task.x_test[:2], np.array([2, 2], np.int32))


def test_per_task_params_under_one_percent_of_resnet18():
    bench = get_benchmark("split-digits", view="image")
    ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=64), bench, "til")
    meth = get_method("clr", ctx, pretrained="none")
    cl = jax.eval_shape(meth.init, jax.random.PRNGKey(0))
    backbone = sum(x.size for x in jax.tree.leaves(cl.frozen))
    row = sum(x.size for x in jax.tree.leaves(cl.per_task)) // ctx.num_tasks  # as results.json counts it
    assert backbone > 11_000_000
    dw = sum(x.size for x in jax.tree.leaves(cl.per_task["reprogram"])) // ctx.num_tasks
    assert 34_000 < dw < 36_000  # the paper's "about 35k depthwise weights"
    assert row / backbone < 0.01, row / backbone


def test_cil_is_refused_with_the_scenario_named():
    with pytest.raises(ValueError, match="scenario 'cil'"):
        build(apply_overrides(quick_cfg(), ["scenario=cil"]))


def quick_cfg():
    return quick_config("clr", sets=TINY)


@pytest.mark.parametrize("name", ["clr_split_cifar100", "clr_5datasets"])
def test_experiment_config_runs_at_tiny_scale(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    assert cfg["method"] == "clr" and cfg["train"]["lr"] == 1e-3 and cfg["train"]["epochs"] == 60
    assert cfg["backbone"]["stem"] == "imagenet" and cfg["backbone"]["nf"] == 64
    # the authors' loader: 224 x 224, ImageNet statistics, no augmentation; their best-epoch selection
    assert cfg["data"] == {**cfg["data"], "image_size": 224, "normalize": "imagenet", "augment": "off"}
    t = cfg["train"]
    assert (t["val_fraction"], t["val_metric"], t["restore_best"], t["early_stop"]) == (0.1, "acc", True, 22)
    assert t["lr_schedule"] == "step:20:0.1"
    from clax.config import check_data
    from clax.data import BENCHMARKS
    from clax.data.pipeline import benchmark_kwargs
    kw = benchmark_kwargs(BENCHMARKS[cfg["benchmark"]], cfg, cfg["benchmark"])  # what reaches the factory
    assert kw["image_size"] == 224 and kw["augment"] is False and kw["mean"] == (0.485, 0.456, 0.406)
    check_data(apply_overrides(cfg, ["data.image_size=32"]))  # the named 32 x 32 variant is a valid config
    from clax.data.pipeline import DATA_DEFAULTS
    cfg = {**cfg, "benchmark": "split-digits", "data": dict(DATA_DEFAULTS)}  # the digits take no data settings
    cfg = apply_overrides(cfg, ["backbone.name=resnet18", *TINY, "backbone.stem=imagenet", "train.epochs=2"])
    assert cfg["train"]["lr"] == 0.01
    out = run_two_tasks(cfg)
    assert out["bwt"] == 0.0 and np.isfinite(out["acc"])
    assert {"val_loss", "val_acc"} <= set(out["history"][0])  # the validation split was held out and measured


def run_two_tasks(cfg):
    """The config's run on the first two tasks of its benchmark."""
    from clax.config import train_config
    from clax.train import fit

    bench, ctx, _ = build(cfg)
    bench = type(bench)(bench.name, bench.tasks[:2], bench.num_classes, bench.input_shape)
    ctx = make_context(ctx.backbone, bench, ctx.scenario)
    meth = get_method(cfg["method"], ctx, **cfg[cfg["method"]])
    return fit(meth, ctx, bench, train_config(cfg), progress=False)
