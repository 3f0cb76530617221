"""WSN: top-c% masks per task, bit-packed storage, consolidated union frozen, zero forgetting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isolation import SMALL, assert_capacity, assert_isolation, isolation_run
from clax.methods import get_method
from clax.transforms import binary_mask, classifier, consolidation


@pytest.fixture(scope="module", params=["split-digits", "permuted-digits"])
def out(request):
    return isolation_run("wsn", request.param, epochs=2, sets=SMALL)


def test_zero_forgetting_and_frozen_union(out):
    assert_isolation(out)


def test_is_a_chain_of_the_masked_network_and_its_transforms(out):
    meth = get_method("wsn", out["ctx"])
    assert meth.model.name == "wsn" and meth.model.scenarios == ("til",) and not meth.model.default
    assert [tr.name for tr in meth.transforms] == ["packed", "consolidation", "bn_refresh"]
    assert [tr.name for tr in get_method("wsn", out["ctx"], bn="batch").transforms] == ["packed", "consolidation"]


def test_learns_and_reports_capacity(out):
    assert np.all(np.diag(out["accuracy_matrix"]) > 0.65), np.diag(out["accuracy_matrix"])
    assert_capacity(out)
    # every task keeps exactly the top 50% of each layer (4096 weights a layer: 2048 by the authors' rule)
    np.testing.assert_allclose(out["report"]["mask_density"], 0.5, atol=1e-6)
    # scores carry over, so later tasks reuse earlier tasks' weights: the union grows far slower than
    # independent masks would make it (1 - 0.5^3 = 0.875 after 3 tasks)
    assert out["report"]["capacity_used"][-1] < 0.8, out["report"]["capacity_used"]


def test_one_live_score_tensor_carried_over_from_task_to_task(out):
    """The authors keep one score tensor per layer; task t starts from task t-1's final scores, so task
    t-1's stored mask is the top-c of the scores task t starts from."""
    cl, meth = out["state"].cl, out["method"]
    assert "scores" in cl.shared and "scores" not in cl.per_task
    for leaf, w in zip(jax.tree.leaves(cl.shared["scores"]), jax.tree.leaves(cl.shared["weights"])):
        assert leaf.shape == w.shape  # one tensor, no task axis
    last = out["bench"].tasks[-1].task_id
    row = np.asarray(cl.extra["packed"][last])
    offset = 0
    for sc in jax.tree.leaves(cl.shared["scores"]):
        n = binary_mask.packed_nbytes(sc.shape)
        want = np.asarray(binary_mask.top_fraction(sc, 0.5)) > 0
        np.testing.assert_array_equal(binary_mask.unpack(row[offset:offset + n], sc.shape), want)
        offset += n
    # only the bit-packed mask is stored beyond the per-task rows (head, biases): no float scores per task
    assert meth.task_bytes(cl, 0) == offset == row.size
    per_task_row = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cl.per_task)) // len(out["snapshots"])
    assert out["params"]["bytes_per_task"][0] == per_task_row + row.size


def test_scores_start_like_the_authors_kaiming_uniform():
    from clax.transforms.binary_mask import init_scores

    w = {"conv": jnp.zeros((3, 3, 16, 32)), "dense": jnp.zeros((400, 10))}
    sc = init_scores(jax.random.PRNGKey(0), w)
    for name, fan_in in (("conv", 3 * 3 * 16), ("dense", 400)):
        a = np.asarray(sc[name])
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound


def test_scores_get_the_straight_through_gradient_through_their_absolute_value(out):
    meth = out["method"]
    cl = out["state"].cl
    x = jnp.asarray(out["bench"].tasks[0].x_train[:8])
    batch = {"x": x, "y": jnp.zeros(8, jnp.int32), "tid": jnp.zeros(8, jnp.int32)}

    def f(scores):
        return meth.loss(cl.replace(shared={**cl.shared, "scores": scores}), batch, jax.random.PRNGKey(0), 0)[0]

    def h(m):  # the same loss as a function of the hard mask itself: W * m
        w_eff = consolidation.apply_masks(cl.shared["weights"], m)
        logits, _ = consolidation.forward(cl, out["ctx"], w_eff, x, 0, batch["tid"], train=True)
        return classifier.cross_entropy(logits, batch["y"])

    g_scores = jax.grad(f)(cl.shared["scores"])
    hard = jax.tree.map(lambda sc: binary_mask.top_fraction(sc, 0.5), cl.shared["scores"])
    g_mask = jax.grad(h)(hard)
    for gs, gm, sc in zip(jax.tree.leaves(g_scores), jax.tree.leaves(g_mask), jax.tree.leaves(cl.shared["scores"])):
        assert float(jnp.abs(gs).sum()) > 0
        np.testing.assert_allclose(gs, gm * jnp.sign(sc), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_c_outside_0_1_is_refused_with_its_name(out, bad):
    with pytest.raises(ValueError, match="wsn.c"):
        get_method("wsn", out["ctx"], c=bad)


def test_the_ambiguous_sparsity_setting_is_gone(out):
    with pytest.raises(ValueError, match="no setting 'sparsity'"):
        get_method("wsn", out["ctx"], sparsity=0.5)


def test_layer_filter_matching_nothing_is_refused_with_its_name(out):
    with pytest.raises(ValueError, match="wsn.layers='no_such_layer' matches no weight"):
        get_method("wsn", out["ctx"], layers="no_such_layer").init(jax.random.PRNGKey(0))


def test_experiment_config_runs_at_tiny_scale_with_zero_forgetting():
    """experiments/wsn_cifar100.py on the offline digits: 2 tasks, the MLP for ResNet-18, WSN's schedule
    (5% validation, plateau:6:2:1e-6, best-epoch restore) on: a task runs its epochs, keeps the best
    validation epoch, and isolation still holds bit for bit."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import wsn_cifar100

    from clax.config import apply_overrides
    from clax.data.pipeline import DATA_DEFAULTS

    cfg = wsn_cifar100.get_config()
    assert cfg["backbone"] == {"name": "resnet18", "nf": 64, "stem": "cifar"} and cfg["wsn"]["c"] == 0.5
    assert cfg["train"]["val_fraction"] == 0.05 and cfg["train"]["lr_schedule"] == "plateau:6:2:1e-6"
    assert cfg["train"]["restore_best"] is True and cfg["train"]["val_metric"] == "loss"
    assert cfg["data"]["augment"] == "off" and cfg["data"]["class_order"] == "natural" and cfg["wsn"]["bn"] == "batch"
    # the digits take no data settings: the data section back at its defaults
    cfg = apply_overrides({**cfg, "benchmark": "split-digits", "data": dict(DATA_DEFAULTS)},
                          ["backbone.name=mlp", "backbone.hidden=[32,32]", "train.epochs=2"])
    out = isolation_run("wsn", cfg=cfg, num_tasks=2)
    assert out["cfg"]["train"]["batch_size"] == 64
    assert_isolation(out)
    # the validation split is on: every task records its epochs and its best (restored) epoch
    assert [r["task"] for r in out["task_training"]] == [0, 1], out["task_training"]
    assert all(0 <= r["best_epoch"] < r["epochs"] <= 2 for r in out["task_training"]), out["task_training"]


def test_capacity_plot_writes_a_png(out, tmp_path):
    from clax.plot import capacity_plot

    path = tmp_path / "capacity.png"
    capacity_plot({"wsn": out["report"], "other": {"capacity_used": [0.2, 0.4, 0.5]}}, str(path), "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_mask_is_the_sorts_without_a_sort_in_the_step(out):
    # issue 17: the top-c selection of every layer is one bisection loop on the float32 bit pattern, not
    # lax.top_k per layer per step; its mask on the trained scores is the sort-based one, bit for bit
    meth = out["method"]
    cl = out["state"].cl
    x = jnp.asarray(out["bench"].tasks[0].x_train[:8])
    batch = {"x": x, "y": jnp.zeros(8, jnp.int32), "tid": jnp.zeros(8, jnp.int32)}
    jaxpr = str(jax.make_jaxpr(lambda cl: meth.loss(cl, batch, jax.random.PRNGKey(0), 0)[0])(cl))
    assert "top_k[" not in jaxpr and " sort[" not in jaxpr
    assert jaxpr.count("while[") == len(jax.tree.leaves(cl.shared["scores"]))  # a count-narrowed search per layer
    for sc in jax.tree.leaves(cl.shared["scores"]):
        np.testing.assert_array_equal(binary_mask.top_fraction(sc, 0.5), binary_mask.top_fraction_sorted(sc, 0.5))


@pytest.fixture(scope="module")
def val_run():
    """2 tasks, 1 epoch, 20% validation: the state at each epoch's end (when the task's row is not stored
    yet) and task 0's test logits after task 0, in task 1's epoch and at the end."""
    from battery import quick_config
    from clax.config import train_config
    from clax.runner import build
    from clax.train import fit, make_context

    cfg = quick_config("wsn", "split-digits", "til", 1, SMALL + ("train.val_fraction=0.2",))
    bench, ctx, meth = build(cfg)
    bench = type(bench)(bench.name, bench.tasks[:2], bench.num_classes, bench.input_shape)
    ctx = make_context(ctx.backbone, bench, "til")
    meth = get_method("wsn", ctx, **cfg["wsn"])
    x0 = jnp.asarray(bench.tasks[0].x_test)
    t0 = jnp.zeros(x0.shape[0], jnp.int32)
    predict = jax.jit(meth.predict)
    mid, logits0 = {}, []

    def on_epoch_end(t, epoch, ts):
        mid[t] = jax.tree.map(np.asarray, ts.cl)
        if t == 1:
            logits0.append(np.asarray(predict(ts.cl, x0, t0)))

    def on_task_end(t, ts, A):
        logits0.append(np.asarray(predict(ts.cl, x0, t0)))

    out = fit(meth, ctx, bench, train_config(cfg), progress=False, on_epoch_end=on_epoch_end,
              on_task_end=on_task_end)
    out.update(mid=mid, logits0=logits0, method=meth, ctx=ctx, bench=bench, cfg=cfg)
    return out


def test_validation_during_a_task_uses_the_live_top_c_mask(val_run):
    """The task's mask is stored only at its end; before that (validation, plateau, best-epoch restore)
    it is predicted with the top-c of the live scores, the training step's mask: its val_acc is that
    mask's accuracy on the held-out rows, computed here with the sort-based top-c, far above chance."""
    from clax.train import validation_split

    out, ctx = val_run, val_run["ctx"]
    rows = {r["task"]: r for r in out["history"]}
    for task in out["bench"].tasks:
        t = task.task_id
        cl = out["mid"][t]
        assert not np.asarray(cl.extra["packed"][t]).any()  # not stored yet at validation time
        masks = jax.tree.map(lambda s: binary_mask.top_fraction_sorted(jnp.asarray(s), 0.5) > 0, cl.shared["scores"])
        w_eff = consolidation.apply_masks(cl.shared["weights"], masks)
        _, val = validation_split(np.asarray(task.y_train), 0.2, out["cfg"]["seed"], t)
        x = jnp.asarray(np.asarray(task.x_train)[val])
        y = task.targets(np.asarray(task.y_train)[val], "til")
        logits, _ = consolidation.forward(cl, ctx, w_eff, x, t, jnp.full(len(val), t, jnp.int32), train=False)
        acc = float(np.mean(np.argmax(np.asarray(logits), -1) == y))
        assert acc > 0.8, acc  # two classes a task: chance is 0.5
        assert rows[t]["val_acc"] == acc, (rows[t]["val_acc"], acc)
    assert out["timing"]["traces"]["eval_step"] == 1  # one compilation serves stored and live masks


def test_a_stored_task_is_predicted_with_its_stored_mask_bit_for_bit(val_run):
    """Task 0's logits after its end, during task 1's epochs (task 1 on its live mask) and at the end:
    identical, and those of task 0's stored mask."""
    out = val_run
    after0, during1, end = out["logits0"]
    np.testing.assert_array_equal(after0, during1)
    np.testing.assert_array_equal(after0, end)
    cl = out["state"].cl
    w_eff = consolidation.apply_masks(cl.shared["weights"], binary_mask.stored(cl, 0))
    x0 = jnp.asarray(out["bench"].tasks[0].x_test)
    logits, _ = consolidation.forward(cl, out["ctx"], w_eff, x0, 0, jnp.zeros(x0.shape[0], jnp.int32), train=False)
    np.testing.assert_allclose(np.asarray(logits), end, rtol=1e-5, atol=1e-5)
    assert binary_mask.is_stored(cl, 0) and binary_mask.is_stored(cl, 1)
