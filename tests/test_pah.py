"""PAH on split-digits (TIL): generated heads, the two optimiser steps, prototypes, checkpoint; the
authors' choices where the paper is silent (KD direction, hypernetwork, its init)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from battery import assert_no_recompile_after_first_task, quick_config, quick_run
from clax.checkpoint import restore_raw
from clax.methods.base import TaskData
from clax.methods.pah import pah, semantic_prototype
from clax.runner import build, run
from clax.transforms.distill import kd_loss, with_snapshot

# the same backbone and training for PAH and finetune; a learning rate at which finetune forgets
SETS = ["backbone.hidden=[64]", "train.lr=5e-3", "train.optimizer=adamw", "train.weight_decay=0.01"]


@pytest.fixture(scope="module")
def pah_run(tmp_path_factory):
    w = tmp_path_factory.mktemp("pah")
    cfg = quick_config("pah", scenario="til", epochs=3, sets=SETS)
    return run(cfg, workdir=str(w), progress=False), str(w)


def test_pah_forgets_less_than_finetune(pah_run):
    res, _ = pah_run
    ft = quick_run("finetune", scenario="til", epochs=3, sets=SETS)
    assert res["forgetting"] < ft["forgetting"], (res["forgetting"], ft["forgetting"])
    assert res["acc"] > 0.85


def test_checkpoint_holds_prototypes_and_hypernetwork_but_no_heads(pah_run):
    res, w = pah_run
    item, cfg = restore_raw(w)
    cl = item["train_state"]["cl"]
    assert set(cl["shared"]) == {"backbone", "hnet", "protos"}
    assert np.asarray(cl["shared"]["protos"]).shape == (5, 2, 100)  # flat 10x10x1 images
    assert not cl["per_task"]  # nothing stored per task but the prototypes
    paths = ["/".join(map(str, k)) for k in flatten_dict(cl)]
    assert not [p for p in paths if "head" in p], paths
    # the only per-task bytes are the prototypes: 2 classes x 10 x 10 x 1 float32
    assert res["params"]["bytes_per_task"] == [800] * 5
    assert_no_recompile_after_first_task(res)
    assert res["timing"]["traces"] == {"train_step": 1, "eval_step": 1}


def test_pah_is_a_chain_of_its_mechanisms():
    """The generated-head model, the two-step distillation, the prototypes and the backbone's rate."""
    _, ctx, meth = build(quick_config("pah", scenario="til", sets=SETS))
    assert meth.model.name == "pah" and meth.model.scenarios == ("til",)
    assert [tr.name for tr in meth.transforms] == ["proto_distill", "prototypes", "backbone_lr"]
    assert meth.lr_scales == (("shared/backbone", 0.1),)
    cl = meth.init(jax.random.PRNGKey(0))
    assert set(cl.extra) == {"proto_distill"} and set(cl.extra["proto_distill"]) == {"teacher", "opt"}
    random = pah(ctx, init="random")  # no semantic initialisation: every image trains
    assert random.train_filter is None and [tr.name for tr in random.transforms][1] == "prototypes"


@pytest.fixture(scope="module")
def built():
    bench, ctx, meth = build(quick_config("pah", scenario="til", sets=SETS))
    cl = meth.init(jax.random.PRNGKey(0))
    task = bench.tasks[1]
    y = task.targets(task.y_train, "til")
    data = TaskData(1, task.x_train, y, jax.random.PRNGKey(1), 32)
    return bench, ctx, meth, cl, data


def test_semantic_init_uses_one_image_per_class_and_removes_it(built):
    bench, ctx, meth, cl, data = built
    cl1 = meth.begin_task(cl, data)
    keep = meth.train_filter(data)
    assert len(keep) == len(data.y) - 2
    dropped = np.setdiff1d(np.arange(len(data.y)), keep)
    assert sorted(data.y[dropped].tolist()) == [0, 1]
    for c in (0, 1):
        i = dropped[data.y[dropped] == c][0]
        want = semantic_prototype(data.x[i], (8, 8, 1), 10, 1)
        np.testing.assert_allclose(np.asarray(cl1.shared["protos"][1, c]), want.reshape(-1), rtol=1e-6)
    # other tasks' prototypes are left alone; the teacher is the model before the task
    np.testing.assert_array_equal(cl1.shared["protos"][0], cl.shared["protos"][0])
    np.testing.assert_array_equal(cl1.extra["proto_distill"]["teacher"]["shared"]["protos"], cl.shared["protos"])


def test_prototype_step_moves_only_old_prototypes(built):
    bench, ctx, meth, cl, data = built
    cl1 = meth.begin_task(cl, data)
    # make the student differ from the teacher so that the alignment loss has a gradient
    cl1 = cl1.replace(shared={**cl1.shared, "hnet": jax.tree.map(lambda p: 1.1 * p, cl1.shared["hnet"])})
    batch = {"x": jnp.asarray(data.x[:32]), "y": jnp.asarray(data.y[:32]), "tid": jnp.ones(32, jnp.int32)}
    cl2 = jax.jit(meth.post_update)(cl1, batch, jax.random.PRNGKey(0), jnp.int32(1))
    p1, p2 = np.asarray(cl1.shared["protos"]), np.asarray(cl2.shared["protos"])
    assert not np.allclose(p2[0], p1[0])            # task 0 (old) moves
    np.testing.assert_array_equal(p2[1:], p1[1:])   # the current and future tasks do not
    for a, b in zip(jax.tree.leaves(cl1.shared["backbone"]), jax.tree.leaves(cl2.shared["backbone"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sets, needle", [
    (["scenario=cil"], "scenario 'cil'"),
    (["pah.proto_size=0"], "pah.proto_size"),
    (["pah.init=zeros"], "pah.init"),
    (["pah.kd_direction=forward"], "pah.kd_direction"),
    (["pah.hnet_init=xavier"], "pah.hnet_init"),
    (["pah.proto_input=crop"], "pah.proto_input"),
    (["pah.proto_input=native"], "pah.proto_input='native' needs an image backbone"),  # the MLP takes flat inputs
    (["pah.hidden=[16,0]"], "pah.hidden"),
    (["pah.bn=refresh"], "pah.bn"),
    (["pah.task_block=0"], "pah.task_block"),
])
def test_bad_settings(sets, needle):
    with pytest.raises(ValueError, match=needle):
        build(quick_config("pah", sets=sets))


@pytest.mark.parametrize("name", ["pah_cifar100", "pah_tinyimagenet"])
def test_pah_experiments_run_tiny_on_digits(name):
    import importlib
    import sys
    sys.path.insert(0, "experiments")
    from test_hnet import _tiny

    from clax.data.pipeline import DATA_DEFAULTS

    cfg = importlib.import_module(name).get_config()
    assert cfg["backbone"] == {"name": "resnet18", "nf": 20, "stem": "cifar"} and cfg["pah"]["alpha"] == 0.5
    assert cfg["pah"]["hidden"] == [16, 16] and cfg["pah"]["kd_direction"] == "student_teacher"
    # the authors' code: never in eval mode, no augmentation, 10% validation (only logged), label order
    assert cfg["pah"]["bn"] == "batch" and cfg["train"]["val_fraction"] == 0.1 and not cfg["train"]["restore_best"]
    assert cfg["data"]["augment"] == "off" and cfg["data"]["class_order"] == "natural"
    assert cfg["data"]["normalize"] == ("half" if name == "pah_cifar100" else "imagenet")
    out = _tiny({**cfg, "data": dict(DATA_DEFAULTS)}, 2)  # the digits take no data settings
    assert np.isfinite(out["acc"]) and out["accuracy_matrix"].shape == (2, 2)
    assert out["state"].cl.shared["protos"].shape == (2, 2, 100)
    assert_no_recompile_after_first_task(out)


# --- the authors' code where the paper is silent (issue 11, fix 6) -----------------------------------

def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_kd_student_teacher(s, t, temp):
    """pah2025/PAH utils.py: distillation_output_loss(s, t, T).mean(): T^2 * sum p_s log(p_s / p_t),
    both probabilities clamped at 1e-10, averaged over the batch."""
    ps = np.clip(_np_softmax(np.asarray(s, np.float64) / temp), 1e-10, None)
    pt = np.clip(_np_softmax(np.asarray(t, np.float64) / temp), 1e-10, None)
    return temp**2 * np.mean(np.sum(ps * np.log(ps / pt), -1))


def _np_kd_teacher_student(s, t, temp):
    ps = _np_softmax(np.asarray(s, np.float64) / temp)
    pt = _np_softmax(np.asarray(t, np.float64) / temp)
    return temp**2 * np.mean(np.sum(pt * np.log(pt / ps), -1))


def test_kd_directions_on_a_hand_example():
    s = np.array([[1.0, -0.5, 2.0], [0.3, 0.0, -1.0], [4.0, 0.0, 0.0]], np.float32)
    # the last row: the teacher's second class has probability e^-30 < 1e-10 at T = 2 (the clamp acts)
    t = np.array([[0.2, 0.4, 3.0], [-1.0, 2.0, 0.5], [0.0, 60.0, 0.0]], np.float32)
    got = float(kd_loss(s, t, 2.0, direction="student_teacher", eps=1e-10))
    np.testing.assert_allclose(got, _np_kd_student_teacher(s, t, 2.0), rtol=1e-5)
    # the default is unchanged: Hinton's KL(teacher || student) (LwF uses it)
    np.testing.assert_allclose(float(kd_loss(s, t, 2.0)), _np_kd_teacher_student(s, t, 2.0), rtol=1e-5)
    assert abs(got - float(kd_loss(s, t, 2.0))) > 0.1  # the example tells the two directions apart
    # a mask restricts both softmaxes: the same as the KD on the unmasked columns alone
    m = np.array([True, False, True])
    np.testing.assert_allclose(float(kd_loss(s, t, 2.0, m[None], "student_teacher", 1e-10)),
                               _np_kd_student_teacher(s[:, m], t[:, m], 2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="direction"):
        kd_loss(s, t, 2.0, direction="sideways")


def _teacher_view(cl):
    """``cl`` with the teacher's model in place of the student's (for its logits through predict)."""
    return with_snapshot(cl, cl.extra["proto_distill"]["teacher"])


def test_default_loss_is_ce_plus_half_the_authors_kd(built):
    """The step-1 loss: CE + 0.5 * T^2 KL(student || teacher) on task 0's head (the paper's alpha 0.5
    and T 2; the direction and the clamp of the authors' code), against numpy on predict's logits."""
    bench, ctx, meth, cl, data = built
    cl1 = meth.begin_task(cl, data)
    mlp = cl1.shared["hnet"]["mlp"]  # the student moves away from the teacher (the model before task 1)
    cl1 = cl1.replace(shared={**cl1.shared, "hnet": {"mlp": mlp[:-1] + [{"kernel": 3.0 * mlp[-1]["kernel"]}]}})
    x = jnp.asarray(data.x[:32])
    batch = {"x": x, "y": jnp.asarray(data.y[:32]), "tid": jnp.ones(32, jnp.int32)}
    _, (_, aux) = jax.jit(meth.loss)(cl1, batch, jax.random.PRNGKey(0), jnp.int32(1))
    zero = jnp.zeros(32, jnp.int32)
    s_log = np.asarray(meth.predict(cl1, x, zero))
    t_log = np.asarray(meth.predict(_teacher_view(cl1), x, zero))
    want = _np_kd_student_teacher(s_log, t_log, 2.0)
    np.testing.assert_allclose(float(aux["kd"]), want, rtol=1e-4)
    assert abs(want - _np_kd_teacher_student(s_log, t_log, 2.0)) > 0.01 * want  # the directions differ here
    np.testing.assert_allclose(float(aux["loss"] - aux["ce"]), 0.5 * want, rtol=1e-4)


def _leaky(z):
    return np.where(z > 0, z, 0.01 * z)


def test_hypernetwork_is_the_authors(built):
    """hyper_hidden_layers=1, hyper_hidden_features=16: emb -> 16 -> 16 -> D*C, LeakyReLU(0.01), no
    bias anywhere, and the raw output is the bias-free head: logits = f @ W (checked in numpy)."""
    bench, ctx, meth, cl, data = built
    mlp = cl.shared["hnet"]["mlp"]
    D, C = ctx.backbone.feature_dim, 2
    assert [np.shape(layer["kernel"]) for layer in mlp] == [(200, 16), (16, 16), (16, D * C)]
    assert all(set(layer) == {"kernel"} for layer in mlp)  # no biases
    e = np.asarray(cl.shared["protos"][3], np.float64).reshape(-1)  # task 3's embedding
    w = [np.asarray(layer["kernel"], np.float64) for layer in mlp]
    h1 = e @ w[0]
    assert (h1 < 0).any() and (h1 > 0).any()  # the slope of the negative part is exercised
    kernel = (_leaky(_leaky(h1) @ w[1]) @ w[2]).reshape(D, C)
    x = jnp.asarray(data.x[:16])
    # the stored backbone is the real one (its lower rate is an optimizer scale, not a stored factor)
    f, _ = ctx.backbone.apply(cl.shared["backbone"], cl.state["backbone"], x, False)
    got = np.asarray(meth.predict(cl, x, jnp.full(16, 3, jnp.int32)))
    np.testing.assert_allclose(got, np.asarray(f, np.float64) @ kernel, rtol=1e-4, atol=1e-6)


def test_hypernetwork_init_is_kaiming_with_the_last_layer_over_10(built):
    """kaiming_normal_(fan_in, relu): std sqrt(2 / fan_in); the last layer then divided by 10."""
    _, _, _, cl, _ = built
    mlp = cl.shared["hnet"]["mlp"]
    for i, layer in enumerate(mlp):
        w = np.asarray(layer["kernel"])
        want = math.sqrt(2.0 / w.shape[0]) / (10.0 if i == len(mlp) - 1 else 1.0)
        np.testing.assert_allclose(w.std(), want, rtol=0.15)  # 256 to 3,200 draws per layer
        assert abs(w.mean()) < 0.25 * want


def test_former_clax_choices_stay_as_settings():
    """hnet_init=affine, head_bias=true, hidden=[16] and kd_direction=teacher_student: clax's PAH
    before issue 11 (one hidden layer, a generated bias, outputs mapped to a LeCun head's scale)."""
    _, ctx, meth = build(quick_config("pah", scenario="til", sets=SETS + [
        "pah.hnet_init=affine", "pah.head_bias=true", "pah.hidden=[16]", "pah.kd_direction=teacher_student"]))
    cl = meth.init(jax.random.PRNGKey(0))
    mlp = cl.shared["hnet"]["mlp"]
    D = ctx.backbone.feature_dim
    assert [np.shape(layer["kernel"]) for layer in mlp] == [(200, 16), (16, D * 2 + 2)]  # kernel and bias
    x = jnp.zeros((4,) + tuple(ctx.input_shape))
    out = np.asarray(meth.predict(cl, x, jnp.zeros(4, jnp.int32)))
    assert np.abs(out).max() > 0  # zero features still give the generated bias


def _recording_backbone(ctx, seen):
    """``ctx`` whose backbone records ``(input shape, train)`` of every call (also while traced)."""
    bb = ctx.backbone

    def apply(params, stats, x, train=False, **kw):
        seen.append((tuple(x.shape), bool(train)))
        return bb.apply(params, stats, x, train, **kw)

    return ctx._replace(backbone=bb._replace(apply=apply))


def _tiny_resnet(sets=()):
    return quick_config("pah", scenario="til", sets=["backbone.name=resnet18", "backbone.nf=4", *sets])


@pytest.mark.parametrize("proto_input, side", [("resize", 32), ("native", 10)])
@pytest.mark.parametrize("bn", ["running", "batch"])
def test_prototype_pass_input_and_statistics(proto_input, side, bn):
    """The paper resizes the prototypes to the input's size; the authors' code feeds them at 10x10
    (``proto_input=native``). ``bn=running`` runs all tasks' prototypes in eval mode; ``bn=batch``
    (the authors' code) normalises each task's C prototypes by their own batch statistics."""
    cfg = _tiny_resnet([f"pah.proto_input={proto_input}", f"pah.bn={bn}"])
    bench, ctx, _ = build(cfg)
    seen = []
    meth = pah(_recording_backbone(ctx, seen), **cfg["pah"])
    cl = jax.eval_shape(meth.init, jax.random.PRNGKey(0))
    batch = {"x": jnp.zeros((4, 32, 32, 3)), "y": jnp.zeros(4, jnp.int32), "tid": jnp.ones(4, jnp.int32)}
    seen.clear()
    jax.eval_shape(meth.post_update, cl, batch, jax.random.PRNGKey(0), jnp.int32(1))
    if bn == "running":  # the prefixes' (2, 4, 5 tasks) 2 prototypes, 3 channels, one eval-mode pass each
        assert set(seen) == {((n * 2, side, side, 3), False) for n in (2, 4, 5)}, seen
    else:  # one pass per task (vmapped: the traced shape is one task's), batch statistics
        assert set(seen) == {((2, side, side, 3), True)}, seen


@pytest.mark.parametrize("bn", ["running", "batch"])
def test_bn_batch_makes_a_prediction_depend_on_its_batch(bn):
    """``bn=batch`` (the authors' code never calls eval()): a test image's logits change with the other
    images of its batch; ``bn=running`` (default): they do not."""
    bench, ctx, meth = build(_tiny_resnet([f"pah.bn={bn}"]))
    cl = meth.init(jax.random.PRNGKey(0))
    x = jnp.asarray(bench.tasks[0].x_test[:8])
    tid = jnp.zeros(8, jnp.int32)
    a = np.asarray(meth.predict(cl, x, tid))[0]
    b = np.asarray(meth.predict(cl, x.at[1:].set(x[1:][::-1] * 2.0), tid))[0]
    if bn == "running":
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert np.abs(a - b).max() > 1e-4, (a, b)


def test_task_blocks_and_prefix_sizes():
    from clax.transforms.generated_head import prefix_sizes, task_blocks
    assert task_blocks(5, 2) == (2, [0, 2, 3])  # the last block overlaps its neighbour, inside the table
    assert task_blocks(20, 4) == (4, [0, 4, 8, 12, 16])
    assert task_blocks(2, 4) == (2, [0])        # a block never exceeds the table
    assert prefix_sizes(20, 2) == [2, 4, 8, 16, 20] and prefix_sizes(5, 5) == [5] and prefix_sizes(3, 8) == [3]
    with pytest.raises(ValueError, match="block"):
        task_blocks(5, 0)


def _step_at(block, t, perturb):
    """post_update alone and a whole train step of pah (split-digits, 5 tasks) at task ``t``."""
    from clax.train import Steps, TrainState, make_optimizer, trainable
    from battery import quick_config as qc
    cfg = qc("pah", scenario="til", sets=SETS + [f"pah.task_block={block}"])
    bench, ctx, meth = build(cfg)
    cl = meth.init(jax.random.PRNGKey(0))
    for r in range(t + 1):
        task = bench.tasks[r]
        cl = meth.begin_task(cl, TaskData(r, task.x_train, task.targets(task.y_train, "til"), jax.random.PRNGKey(1), 32))
    if perturb:  # the student away from the teacher (the model before task t)
        cl = cl.replace(shared=jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(5), a.shape),
                                            cl.shared))
    task = bench.tasks[t]
    y = task.targets(task.y_train, "til")
    batch = {"x": jnp.asarray(task.x_train[:32]), "y": jnp.asarray(y[:32]), "tid": jnp.full(32, t, jnp.int32)}
    tt = jnp.int32(t)
    post = jax.jit(meth.post_update)(cl, batch, jax.random.PRNGKey(0), tt)
    from clax.config import train_config
    tx = make_optimizer(train_config(cfg), meth)
    ts = TrainState(cl, tx.init(trainable(cl, tt)), jax.random.PRNGKey(2), jnp.zeros((), jnp.int32))
    ts, m = Steps(meth, tx, "til").train_step(ts, batch, tt)
    return post, ts, {k: v for k, v in m.items() if k != "grad_norm"}


@pytest.mark.parametrize("t, perturb", [(1, True), (3, True), (4, False)])
def test_blocks_of_tasks_give_the_whole_tables_step_bit_for_bit(t, perturb):
    """task_block=2 (the default: prefixes of 2, 4, 5 tasks in the model's pass, blocks [0, 2), [2, 4),
    [3, 5) in the prototype step) against task_block=5 (the whole table, the computation before issue
    17): the prototype step and the whole train step give the same bits (signs of zeros included)."""
    whole, blocked = _step_at(5, t, perturb), _step_at(2, t, perturb)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(blocked)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_tasks_not_yet_seen_are_not_computed(built):
    """The step's cost follows the tasks seen: prototypes of tasks after the blocks it needs never enter
    it (NaN there leaves the step finite; over the whole masked table their NaN reached the hypernetwork's
    gradient through 0 * NaN), and the model's rows for them are 0."""
    bench, ctx, meth, cl, data = built
    cl1 = meth.begin_task(cl, data)  # task 1 of 5: the blocks of tasks 0-1 are all it needs
    cl1 = cl1.replace(shared={**cl1.shared, "protos": cl1.shared["protos"].at[2:].set(jnp.nan)})
    batch = {"x": jnp.asarray(data.x[:32]), "y": jnp.asarray(data.y[:32]), "tid": jnp.ones(32, jnp.int32)}
    _, aux, _ = jax.jit(meth.model.forward, static_argnums=4)(cl1, batch["x"], batch["tid"], jnp.int32(1), True,
                                                              jax.random.PRNGKey(0))
    assert np.all(np.isfinite(aux["outputs"][:, :2])) and np.all(np.asarray(aux["outputs"][:, 2:]) == 0)
    from clax.train import Steps, TrainState, make_optimizer, trainable
    from clax.config import train_config
    tx = make_optimizer(train_config(quick_config("pah", scenario="til", sets=SETS)), meth)
    tt = jnp.int32(1)
    ts = TrainState(cl1, tx.init(trainable(cl1, tt)), jax.random.PRNGKey(2), jnp.zeros((), jnp.int32))
    ts, m = Steps(meth, tx, "til").train_step(ts, batch, tt)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    for path, leaf in jax.tree.leaves_with_path(ts.cl.shared):
        a = np.asarray(leaf)
        assert np.all(np.isfinite(a[:2] if "protos" in jax.tree_util.keystr(path) else a)), path


def test_prototype_table_rows_are_flattened_images():
    """The table stores each prototype flattened row-major (``[T, C, s * s * ch]``); ``as_images`` gives
    the images back, finding ``ch`` from the size where it is not given; old 5-d tables pass through."""
    from clax.inspect import prototype_images
    from clax.transforms.prototype import as_images, image_shape

    assert image_shape(100) == (10, 1) and image_shape(300) == (10, 3) and image_shape(48) == (4, 3)
    assert image_shape(12) == (2, 3) and image_shape(8) is None and image_shape(0) is None
    a = np.arange(2 * 3 * 300).reshape(2, 3, 300)
    imgs = as_images(a)
    assert imgs.shape == (2, 3, 10, 10, 3) and imgs[1, 2, 4, 5, 1] == a[1, 2, (4 * 10 + 5) * 3 + 1]
    assert as_images(np.zeros((2, 3, 300)), channels=3).shape == (2, 3, 10, 10, 3)
    five = np.zeros((2, 3, 10, 10, 1))
    assert as_images(five) is five
    with pytest.raises(ValueError, match="7 numbers each"):
        as_images(np.zeros((2, 3, 7)))
    with pytest.raises(ValueError, match="x 3 images"):
        as_images(np.zeros((2, 3, 100)), channels=3)
    assert prototype_images(np.zeros((2, 7, 7))) is None and prototype_images(np.zeros((2, 100))) is None


def test_a_checkpoint_with_the_old_5d_prototype_table_restores(built):
    """Checkpoints written before the flat table hold ``[T, C, 10, 10, 1]`` prototypes (and moments):
    restoring reshapes them (row-major, the same numbers); other shape mismatches are still refused."""
    import optax
    from flax import serialization

    from clax.checkpoint import merged_trailing, restore_train_state
    from clax.train import TrainState, trainable

    _, _, meth, cl, _ = built
    tx = optax.adam(1e-3)
    ts = TrainState(cl, tx.init(trainable(cl, 0)), jax.random.PRNGKey(0), jnp.zeros((), jnp.int32))
    flat = tuple(cl.shared["protos"].shape)
    old = jax.tree.map(lambda a: np.asarray(a).reshape(flat[:2] + (10, 10, 1)) if np.shape(a) == flat else a,
                       serialization.to_state_dict(ts))
    assert np.shape(old["cl"]["shared"]["protos"]) == flat[:2] + (10, 10, 1)
    back = restore_train_state(old, meth, tx)
    jax.tree.map(np.testing.assert_array_equal, back, ts)
    assert merged_trailing((5, 2, 10, 10, 1), (5, 2, 100)) and merged_trailing((4, 3, 2), (24,))
    assert not merged_trailing((5, 2, 100), (5, 2, 100)) and not merged_trailing((2, 5, 100), (5, 2, 100))
    assert not merged_trailing((5, 2, 10, 9), (5, 2, 100)) and not merged_trailing((3, 4), (4, 3))
    bad = jax.tree.map(lambda a: np.zeros(flat[:2] + (99,), np.float32) if np.shape(a) == flat else a,
                       serialization.to_state_dict(ts))
    with pytest.raises(ValueError, match="has shape"):
        restore_train_state(bad, meth, tx)
