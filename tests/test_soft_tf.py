"""Soft-TF: zero forgetting in TIL (soft and binary), stored bytes, CIL task-id inference report,
bad input, experiment configs at tiny scale."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from battery import assert_no_recompile_after_first_task, assert_zero_forgetting, quick_config, quick_run
from clax.config import apply_overrides
from clax.methods.frozen import checked_predict
from clax.runner import build
from clax.transforms import binary_mask
from clax.models import get_backbone
from test_clr import run_two_tasks
from test_pretrained import as_state_dict, assert_is_checkpoint, file_sha256, save_safetensors

TINY = ["backbone.dim=32", "backbone.heads=2", "soft_tf.pretrained=none"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``(state dict, path)``: the tiny ViT of ``TINY`` as a timm-layout .safetensors, its values a random
    initialisation of another key than soft_tf's own (so ignoring the file shows)."""
    params, _ = get_backbone("vit", (32, 32, 3), dim=32, heads=2, depth=3).init(jax.random.PRNGKey(7))
    sd = as_state_dict(params)
    return sd, save_safetensors(sd, str(tmp_path_factory.mktemp("ckpt") / "vit.safetensors"))


@pytest.fixture(scope="module")
def til(checkpoint):
    """The run the tests below share: its frozen ViT is an imported checkpoint (soft_tf.pretrained at its
    default)."""
    return quick_run("soft_tf", scenario="til", epochs=2, num_tasks=3,
                     sets=["backbone.dim=32", "backbone.heads=2", f"backbone.pretrained={checkpoint[1]}"])


def test_given_checkpoint_is_frozen_exactly_as_loaded(til, checkpoint):
    """backbone.pretrained=PATH with the default soft_tf.pretrained ("auto"): no glyph pretraining; the
    run trains with the file's values bit for bit and reports the file and its SHA-256."""
    sd, path = checkpoint
    assert til["cfg"]["soft_tf"]["pretrained"] == "auto"
    assert_is_checkpoint(til["state"].cl.frozen["backbone"], sd)  # after the run
    assert_is_checkpoint(til["method"].init(jax.random.PRNGKey(0)).frozen["backbone"], sd)  # what fit() starts from
    rep = til["report"]["pretrain"]  # results.json's "pretrain"
    assert rep["source"] == "file" and rep["steps"] == 0
    assert rep["path"] == os.path.abspath(path) and rep["sha256"] == file_sha256(path)


def test_glyphs_with_a_checkpoint_is_refused_naming_both_settings(checkpoint):
    with pytest.raises(ValueError, match=r"soft_tf\.pretrained='glyphs'.*backbone\.pretrained="):
        build(quick_config("soft_tf", sets=["backbone.dim=32", "backbone.heads=2",
                                            f"backbone.pretrained={checkpoint[1]}", "soft_tf.pretrained=glyphs"]))


def test_zero_forgetting_bit_for_bit_and_no_recompile(til):
    assert_zero_forgetting(til)
    assert_no_recompile_after_first_task(til)
    assert np.mean(np.diag(til["accuracy_matrix"])) > 0.75, til["accuracy_matrix"]


def test_masks_are_stored_in_int8_and_counted_so(til):
    cl = til["state"].cl
    masks = cl.per_task["mask"]
    assert len(masks) == 12  # 4 projections x the last 3 blocks
    # evaluated as stored: each trained row takes at most 256 distinct values
    m = np.asarray(masks["blocks_2.mlp.fc1.kernel"])
    assert len(np.unique(m[0])) <= 256 and len(np.unique(m[2])) <= 256
    n = sum(int(np.prod(v.shape[1:])) for v in masks.values())
    head = sum(int(np.prod(v.shape[1:])) * 4 for v in jax.tree.leaves(cl.per_task["head"]))
    assert til["params"]["bytes_per_task"][0] == n + 8 * len(masks) + head
    assert set(til["report"]["accuracy_by_mask_precision"]) == {"float32", "float16", "bfloat16", "int8"}


def test_binary_variant_forgets_nothing_and_is_bit_packed():
    out = quick_run("soft_tf", scenario="til", epochs=1, sets=TINY + ["soft_tf.binary=true", "soft_tf.keep=0.5"],
                    num_tasks=2)
    assert_zero_forgetting(out)
    masks = out["state"].cl.per_task["mask"]
    m = np.asarray(masks["blocks_1.attn.qkv.kernel"][0])
    assert set(np.unique(m)) == {0.0, 1.0} and abs(m.mean() - 0.5) < 0.01
    head = sum(int(np.prod(v.shape[1:])) * 4 for v in jax.tree.leaves(out["state"].cl.per_task["head"]))
    packed = sum(binary_mask.packed_nbytes(v.shape[1:]) for v in masks.values())
    assert out["params"]["bytes_per_task"][0] == packed + head


def test_cil_reports_task_id_accuracy_of_both_rules():
    out = quick_run("soft_tf", scenario="cil", epochs=2, sets=TINY, num_tasks=3)
    ti = out["report"]["task_inference"]
    assert ti["rule"] == "ncm" and set(ti["task_id_accuracy"]) == {"ncm", "entropy"}
    assert ti["task_id_accuracy"]["ncm"] > 0.5  # 3 tasks: chance is 1/3
    # the class accuracy of the default rule is the run's pooled final accuracy
    A, sizes = out["accuracy_matrix"][-1], np.array([len(t.y_test) for t in out["bench"].tasks])
    assert ti["class_accuracy"]["ncm"] == pytest.approx(float(A @ sizes / sizes.sum()))


def test_soft_tf_is_a_chain_of_the_masked_vit_and_its_transforms(til):
    meth = til["method"]
    assert meth.model.name == "soft_tf" and meth.model.ce is not None  # label smoothing
    assert [tr.name for tr in meth.transforms] == ["stored_masks", "trained", "pretrained"]
    _, _, cil = build(quick_config("soft_tf", scenario="cil", sets=TINY))
    assert [tr.name for tr in cil.transforms] == ["stored_masks", "task_inference", "trained", "pretrained"]


def test_soft_tf_plus_replay_trains_in_cil():
    """Rehearsal composes with the frozen ViT: replay's rows carry old task ids, scored under their own
    task's stored masks and head (per-sample dispatch); both terms are finite in both tasks."""
    out = quick_run("soft_tf+replay", scenario="cil", epochs=1, sets=TINY, num_tasks=2)
    meth = out["method"]
    assert meth.model.name == "soft_tf"
    assert [tr.name for tr in meth.transforms][-1] == "replay"
    assert len(out["history"]) == 2
    for row in out["history"]:
        assert np.isfinite(row["ce"]) and np.isfinite(row["replay"]), row
    assert 0 < out["history"][1]["replay"] < 10  # task 1 draws task 0's rows: scored under task 0's head
    assert int(out["state"].cl.extra["replay"]["seen"]) > 0
    assert np.all(np.isfinite(out["accuracy_matrix"][-1])), out["accuracy_matrix"]


def test_untrained_task_id_and_empty_filter_are_named(til):
    meth, cl, task = til["method"], til["state"].cl, til["bench"].tasks[0]
    cl2 = cl.replace(extra={**cl.extra, "trained": cl.extra["trained"].at[1].set(False)})
    with pytest.raises(ValueError, match="task id 1 has not been trained"):
        checked_predict(meth, cl2, task.x_test[:4], np.array([0, 1, 0, 0], np.int32))
    with pytest.raises(ValueError, match="'blocks_7/attn/qkv'"):
        build(quick_config("soft_tf", sets=TINY + ["soft_tf.mask_filter=blocks_7/attn/qkv"]))
    with pytest.raises(ValueError, match="masked_blocks"):
        build(quick_config("soft_tf", sets=TINY + ["soft_tf.masked_blocks=4"]))


@pytest.mark.parametrize("name", ["soft_tf_cifar100", "soft_tf_imagenet_r"])
def test_experiment_config_runs_at_tiny_scale(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    assert cfg["backbone"]["dim"] == 768 and cfg["train"]["batch_size"] == 24 and cfg["train"]["clip"] == 1.0
    assert cfg["soft_tf"]["masked_blocks"] == 3 and cfg["soft_tf"]["label_smoothing"] == 0.1
    cfg["benchmark"] = "split-digits"
    cfg = apply_overrides(cfg, ["backbone.patch=8", "backbone.depth=3", *TINY, "train.epochs=1", "scenario=til",
                                "soft_tf.e_prompt_layers=[-1]"])  # the paper's blocks do not exist at depth 3
    out = run_two_tasks(cfg)
    assert out["bwt"] == 0.0 and np.isfinite(out["acc"])
