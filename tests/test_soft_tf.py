"""Soft-TF: zero forgetting in TIL (soft and binary), stored bytes, CIL task-id inference report,
bad input, experiment configs at tiny scale."""
import importlib.util
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from battery import assert_no_recompile_after_first_task, assert_zero_forgetting, quick_config, quick_run
from clax.config import apply_overrides
from clax.data import BENCHMARKS
from clax.data.pipeline import benchmark_kwargs
from clax.methods import get_method, method_settings
from clax.methods.frozen import checked_predict
from clax.runner import build
from clax.transforms import binary_mask, task_inference
from clax.transforms.task_inference import class_tasks, majority
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
    by_prec = til["report"]["accuracy_by_mask_precision"]
    assert set(by_prec) == {"float32", "float16", "bfloat16", "int8"}
    # the report evaluates by the eval step: at the stored precision it is the accuracy matrix's last row,
    # counted over every task's test rows
    n = np.array([len(t.y_test) for t in til["bench"].tasks])
    assert by_prec["int8"] == round(float(np.sum(np.asarray(til["accuracy_matrix"])[-1] * n))) / n.sum()


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


@pytest.fixture(scope="module")
def cil():
    """A CIL run (per-sample task ids) the task-inference tests share."""
    return quick_run("soft_tf", scenario="cil", epochs=2, sets=TINY, num_tasks=3)


def test_cil_reports_task_id_accuracy_of_both_rules(cil):
    out = cil
    ti = out["report"]["task_inference"]
    assert ti["rule"] == "ncm" and set(ti["task_id_accuracy"]) == {"ncm", "entropy"}
    assert "vote" not in ti and "task_id_accuracy_batchwise" not in ti  # the vote is opt-in
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


def numpy_majority(ids, group):
    """The batchwise vote in numpy: each group's most frequent id, the lowest on a tie."""
    out = np.empty_like(ids)
    for s in range(0, len(ids), group):
        out[s:s + group] = np.argmax(np.bincount(ids[s:s + group]))
    return out


def test_majority_gives_each_group_its_most_frequent_id():
    ids = jnp.array([0, 1, 1, 2, 2, 2, 0, 1, 2, 0], jnp.int32)
    np.testing.assert_array_equal(majority(ids, 3, 3), [1, 1, 1, 2, 2, 2, 0, 0, 0, 0])  # tie -> lowest; last group of 1
    rng = np.random.default_rng(0)
    for b, g, t in [(24, 24, 10), (50, 7, 4), (5, 8, 3), (31, 1, 5)]:
        ids = rng.integers(0, t, b).astype(np.int32)
        v = np.asarray(majority(jnp.asarray(ids), g, t))
        np.testing.assert_array_equal(v, numpy_majority(ids, g))
        for s in range(0, b, g):  # one id per group
            assert len(set(v[s:s + g])) == 1


def test_batch_vote_predicts_the_group_majority_and_reports_both(cil):
    """batch_vote=N: every row of a group of N consecutive test rows gets the group's majority of the
    per-sample rule's task ids, the prediction (hence the accuracy matrix) uses it, and results.json's
    task_inference gives the per-sample figures beside the batchwise ones."""
    n = 7  # does not divide the task test sets: the last group of each is shorter
    cfg = apply_overrides(cil["cfg"], [f"soft_tf.batch_vote={n}"])
    voting = get_method("soft_tf", cil["ctx"], **method_settings(cfg))
    meth, cl, bench = cil["method"], cil["state"].cl, cil["bench"]
    class_task = class_tasks(cil["ctx"])
    got = []  # per task: (task ids per sample, prediction under the vote, targets, true task ids)
    for t in bench.tasks:
        x, y = jnp.asarray(t.x_test), t.targets(t.y_test, "cil")
        per_sample = class_task[np.asarray(jnp.argmax(jax.jit(meth.predict)(cl, x, None), -1))]
        pred = np.asarray(jnp.argmax(jax.jit(voting.predict)(cl, x, None), -1))
        np.testing.assert_array_equal(class_task[pred], numpy_majority(per_sample, n))
        got.append((per_sample, pred, y, np.full(len(y), t.task_id)))
    # the report, on the last two tasks (in one pass; the vote's groups stay within a task): both
    # figures, computed as above
    last = type(bench)(bench.name, bench.tasks[-2:], bench.num_classes, bench.input_shape)
    per_sample, pred, y, tid = (np.concatenate(v) for v in zip(*got[-2:]))
    report = next(tr.test_report for tr in voting.transforms if "task_inference" in tr.owns)
    ti = report(cl, last)["task_inference"]
    assert ti["vote"] == n and ti["rule"] == "ncm" and set(ti["task_id_accuracy_batchwise"]) == {"ncm", "entropy"}
    assert ti["task_id_accuracy"]["ncm"] == pytest.approx(np.mean(per_sample == tid))
    assert ti["task_id_accuracy_batchwise"]["ncm"] == pytest.approx(np.mean(class_task[pred] == tid))
    assert ti["class_accuracy_batchwise"]["ncm"] == pytest.approx(np.mean(pred == y))
    with pytest.raises(ValueError, match=r"soft_tf\.batch_vote"):
        build(quick_config("soft_tf", scenario="cil", sets=TINY + ["soft_tf.batch_vote=-2"]))
    with pytest.raises(ValueError, match="vote must be an integer >= 0"):
        task_inference.task_inference(cil["ctx"], None, meth.predict, vote=-1)


def test_label_smoothing_zero_is_plain_cross_entropy():
    """The authors' loss: label_smoothing=0 is cross-entropy with integer labels over the task's classes
    (other tasks' logits masked); 0.1, the method's default, is not."""
    _, ctx, plain = build(quick_config("soft_tf", scenario="cil", sets=TINY + ["soft_tf.label_smoothing=0"]))
    _, _, smooth = build(quick_config("soft_tf", scenario="cil", sets=TINY))
    tid = jnp.array([0, 1, 2, 1], jnp.int32)
    y = jnp.asarray([int(ctx.task_classes[t][i]) for t, i in zip([0, 1, 2, 1], [0, 1, 0, 1])])
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, ctx.num_outputs)) * 3
    logits = jnp.where(ctx.output_mask()[tid], logits, -1e9)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    np.testing.assert_allclose(plain.model.ce(logits, y, tid, 1), want, rtol=1e-6)
    assert float(jnp.min(jnp.abs(smooth.model.ce(logits, y, tid, 1) - want))) > 1e-3


def mask_blocks(sets, depth=12):
    """The blocks whose weights a soft_tf built with ``sets`` masks (a tiny ViT of ``depth`` blocks)."""
    _, _, meth = build(quick_config("soft_tf", sets=TINY + [f"backbone.depth={depth}", "backbone.patch=8"] + sets))
    keys = sorted(meth.init(jax.random.PRNGKey(0)).per_task["mask"])
    blocks = sorted({int(k.split(".")[0].split("_")[1]) for k in keys})
    assert all(sorted(k for k in keys if k.startswith(f"blocks_{b}.")) == [
        f"blocks_{b}.attn.proj.kernel", f"blocks_{b}.attn.qkv.kernel", f"blocks_{b}.mlp.fc1.kernel",
        f"blocks_{b}.mlp.fc2.kernel"] for b in blocks), keys
    return blocks


def load_experiment(name):
    """The experiments/ module ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_masked_layers_mask_exactly_the_named_blocks():
    assert mask_blocks(["soft_tf.masked_layers=[1]"], depth=3) == [1]
    assert mask_blocks(["soft_tf.masked_layers=[-1,0]"], depth=3) == [0, 2]
    assert mask_blocks(["soft_tf.masked_blocks=2"], depth=3) == [1, 2]
    with pytest.raises(ValueError, match=r"soft_tf\.masked_layers=\[5\]: layer 5 does not exist in a backbone of depth"):
        build(quick_config("soft_tf", sets=TINY + ["soft_tf.masked_layers=[5]"]))
    # the experiments' two named options on a 12-block ViT: the paper text's last three, the authors' code's one
    for name, code in [("soft_tf_cifar100", [11]), ("soft_tf_imagenet_r", [5])]:
        masked = load_experiment(name).MASKED
        assert mask_blocks(masked["paper"]) == [9, 10, 11] and mask_blocks(masked["code"]) == code


@pytest.mark.parametrize("name, base_lr, epochs", [("soft_tf_cifar100", 0.03, 20), ("soft_tf_imagenet_r", 0.005, 50)])
def test_experiment_config_runs_at_tiny_scale(name, base_lr, epochs):
    mod = load_experiment(name)
    cfg = mod.get_config()
    assert cfg["backbone"]["dim"] == 768 and cfg["train"]["batch_size"] == 24 and cfg["train"]["clip"] == 1.0
    # the authors' rate: base * batch / 256
    assert cfg["train"]["lr"] == pytest.approx(base_lr * 24 / 256) and cfg["train"]["epochs"] == epochs
    assert cfg["soft_tf"]["masked_blocks"] == 3 and cfg["soft_tf"]["label_smoothing"] == 0.0
    assert cfg["train"]["eval_batch_size"] == 24
    # the authors' [0, 1] inputs and natural class order reach the data set's factory
    authors = apply_overrides(cfg, [o for o in mod.AUTHORS if o.startswith("data.")])
    factory = BENCHMARKS[cfg["benchmark"]]
    if "class_order" in inspect.signature(factory).parameters:
        kw = benchmark_kwargs(factory, authors, cfg["benchmark"])
        assert kw["mean"] is None and kw["std"] is None and kw["class_order"] == "natural"
    cfg["benchmark"] = "split-digits"
    tiny = ["backbone.patch=8", "backbone.depth=3", *TINY, "train.epochs=1", "scenario=til",
            "soft_tf.e_prompt_layers=[-1]"]  # the paper's blocks do not exist at depth 3
    out = run_two_tasks(apply_overrides(cfg, tiny))
    assert out["bwt"] == 0.0 and np.isfinite(out["acc"])
    # the authors' options that split-digits takes (not the masked block 11/5, absent at depth 3) reach the
    # method: G-prompts in every task, float32 masks, the vote over 24 rows
    opts = [o for o in mod.AUTHORS if not o.startswith(("data.", "soft_tf.masked_layers"))]
    bench, ctx, meth = build(apply_overrides(cfg, tiny + opts + ["scenario=cil"]))
    cl = meth.init(jax.random.PRNGKey(0))
    cl = cl.replace(extra={**cl.extra, "trained": jnp.ones_like(cl.extra["trained"])})  # every task may be chosen
    assert meth.report(cl)["prompts"]["g_prompt_tasks"] == "all" and all(
        tr.update_mask is None for tr in meth.transforms if tr.name == "prompts")
    x = jnp.asarray(np.concatenate([t.x_test[:10] for t in bench.tasks[:3]]))
    ids = class_tasks(ctx)[np.asarray(jnp.argmax(jax.jit(meth.predict)(cl, x, None), -1))]
    assert len(set(ids[:24])) == 1 and len(set(ids[24:])) == 1  # one task id per group of 24
