"""IBM: variational masks, consolidation of the union, re-initialisation of free positions only,
test-time weights W * zscale_t * mask_t, zero forgetting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isolation import SMALL, assert_capacity, assert_isolation, isolation_run
from clax.methods import TaskData, get_method
from clax.partition import task_row
from clax.transforms import consolidation
from clax.transforms import variational_mask as vm


@pytest.fixture(scope="module", params=["split-digits", "permuted-digits"])
def out(request):
    return isolation_run("ibm", request.param, epochs=3, sets=SMALL)


def test_zero_forgetting_and_frozen_union(out):
    assert_isolation(out)


def test_is_a_chain_of_the_masked_network_and_its_transforms(out):
    meth = get_method("ibm", out["ctx"])
    assert meth.model.name == "ibm" and meth.model.scenarios == ("til",) and not meth.model.default
    assert [tr.name for tr in meth.transforms] == ["bottleneck", "consolidation", "bn_refresh"]
    assert [tr.name for tr in get_method("ibm", out["ctx"], bn="batch").transforms] == ["bottleneck", "consolidation"]


def test_learns_prunes_and_reports_capacity(out):
    assert np.all(np.diag(out["accuracy_matrix"]) > 0.65), np.diag(out["accuracy_matrix"])
    assert_capacity(out)
    # the bottleneck prunes: every task's sub-network leaves weights out
    assert max(out["report"]["mask_density"]) < 0.95, out["report"]


def test_prediction_uses_w_times_zscale_times_mask(out):
    cl, ctx, meth, s = out["state"].cl, out["ctx"], out["method"], out["cfg"]["ibm"]
    t = 1
    mu = jax.tree.map(lambda a: a * s["vb_lr_mult"], task_row(cl.per_task["mu"], t))
    log_d = jax.tree.map(lambda a: a * s["vb_lr_mult"], task_row(cl.per_task["logD"], t))
    w = jax.tree.map(lambda a, z, m: a * z * m, cl.shared["weights"], vm.zscale(mu, log_d), vm.mask(mu, log_d))
    x = jnp.asarray(out["bench"].tasks[t].x_test)
    tid = jnp.full((x.shape[0],), t, jnp.int32)
    want = consolidation.forward(cl, ctx, w, x, t, tid, train=False)[0]
    np.testing.assert_allclose(np.asarray(meth.predict(cl, x, tid)), np.asarray(want), rtol=1e-6, atol=1e-6)
    # and the consolidated union contains that mask
    for m, c in zip(jax.tree.leaves(vm.mask(mu, log_d)), jax.tree.leaves(cl.extra["consolidation"])):
        assert not np.any(np.asarray(m) & ~np.asarray(c))


def test_svd_ratio_is_set_per_layer(out):
    ratios = jax.tree.leaves(out["state"].cl.extra["bottleneck"]["ratio"])
    assert len(ratios) == 2 and all(0 < float(r) <= 1 for r in ratios)
    assert any(float(r) < 1 for r in ratios)  # recomputed from the features, not the initial 1


def test_begin_task_reinitialises_only_free_positions(out):
    meth = get_method("ibm", out["ctx"], vb_lr_mult=1.0)
    cl = meth.init(jax.random.PRNGKey(0))
    w = cl.shared["weights"]
    cons = jax.tree.map(lambda a: jnp.arange(a.size).reshape(a.shape) % 3 == 0, w)
    trained = jax.tree.map(lambda a: jnp.full(a.shape, 7.0), w)
    per_task = dict(cl.per_task)
    per_task["mu"] = jax.tree.map(lambda a, v: a.at[0].set(v), cl.per_task["mu"], trained)
    cl = cl.replace(per_task=per_task, extra={**cl.extra, "consolidation": cons})
    fresh = task_row(cl.per_task["mu"], 1)
    data = TaskData(1, np.zeros((1, 64), np.float32), np.zeros(1, np.int32), jax.random.PRNGKey(0), 32)
    new = task_row(meth.begin_task(cl, data).per_task["mu"], 1)
    for n, f, c in zip(jax.tree.leaves(new), jax.tree.leaves(fresh), jax.tree.leaves(cons)):
        n, f, c = map(np.asarray, (n, f, c))
        assert np.all(n[c] == 7.0) and np.array_equal(n[~c], f[~c])
        assert abs(f.mean() - 1.0) < 1e-2  # the fresh draw is N(1, 0.01)


def test_kl_enters_the_loss_with_its_factor(out):
    cl, meth = out["state"].cl, out["method"]
    x = jnp.asarray(out["bench"].tasks[0].x_train[:8])
    batch = {"x": x, "y": jnp.zeros(8, jnp.int32), "tid": jnp.zeros(8, jnp.int32)}
    total, (_, m) = meth.loss(cl, batch, jax.random.PRNGKey(0), 0)
    s = out["cfg"]["ibm"]
    mu = jax.tree.map(lambda a: a * s["vb_lr_mult"], task_row(cl.per_task["mu"], 0))
    log_d = jax.tree.map(lambda a: a * s["vb_lr_mult"], task_row(cl.per_task["logD"], 0))
    want_kl = float(vm.total_kl(mu, log_d, cl.extra["bottleneck"]["ratio"])) / 8
    np.testing.assert_allclose(float(m["kl"]), want_kl, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(m["ce"]) + s["kl_fac"] * want_kl, rtol=1e-5)


def test_layer_filter_matching_nothing_is_refused_with_its_name(out):
    with pytest.raises(ValueError, match="ibm.layers='nowhere' matches no weight"):
        get_method("ibm", out["ctx"], layers="nowhere").init(jax.random.PRNGKey(0))


def test_cil_is_refused(out):
    ctx = out["ctx"]._replace(scenario="cil")
    with pytest.raises(ValueError, match="til"):
        get_method("ibm", ctx).init(jax.random.PRNGKey(0))


def _experiment_on_digits(cfg, sets=()):
    """An experiment config on the offline digits (the real loaders need data on disk): the data
    section back at its defaults (the digits take none of it), the MLP in place of ResNet-18."""
    from clax.config import apply_overrides
    from clax.data.pipeline import DATA_DEFAULTS

    return apply_overrides({**cfg, "benchmark": "split-digits", "data": dict(DATA_DEFAULTS)},
                           ["backbone.name=mlp", "backbone.hidden=[32,32]", "ibm.svd_samples=16", *sets])


def _experiments():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import ibm_cifar100
    import ibm_tinyimagenet
    return ibm_cifar100, ibm_tinyimagenet


@pytest.fixture(scope="module")
def experiment():
    """experiments/ibm_cifar100.py at tiny scale on the offline digits: 2 tasks, 1 epoch, the MLP in
    place of ResNet-18 (whose compilation alone costs minutes on 2 loaded cores; the ResNet-18 path,
    per-task BatchNorm included, is checked by ``python tests/test_ibm.py``)."""
    ibm_cifar100, _ = _experiments()
    return isolation_run("ibm", cfg=_experiment_on_digits(ibm_cifar100.get_config(), ["train.epochs=1"]),
                         num_tasks=2)


def test_experiment_config_runs_at_tiny_scale_with_zero_forgetting(experiment):
    assert experiment["cfg"]["ibm"]["kl_fac"] == 1e-3 and experiment["cfg"]["train"]["batch_size"] == 256
    assert_isolation(experiment)
    assert np.isfinite(experiment["acc"])


def test_experiment_configs_follow_the_authors_scripts():
    """config/CIFAR100/ib.sh and config/TinyImageNet/ib.sh: one Adam at 1e-3 over every parameter,
    batch 256, 10 / 300 epochs; seq-tinyimg is 10 tasks of 20 with the 7x7/2 stem without max-pool;
    batch-statistics BatchNorm, label-order classes."""
    from clax.models import check_backbone_settings

    ibm_cifar100, ibm_tinyimagenet = _experiments()
    c, t = ibm_cifar100.get_config(), ibm_tinyimagenet.get_config()
    assert c["ibm"]["vb_lr_mult"] == 1.0 and c["train"]["epochs"] == 10 and c["ibm"]["bn"] == "batch"
    assert c["data"]["class_order"] == "natural" and c["data"]["augment"] == "default"
    assert t["benchmark"] == "split-tinyimagenet" and t["train"]["epochs"] == 300
    assert t["backbone"] == {"name": "resnet18", "nf": 64, "stem": "imagenet-nomaxpool"}
    assert check_backbone_settings("resnet18", {k: v for k, v in t["backbone"].items() if k != "name"})["stem"] \
        == "imagenet-nomaxpool"


def test_released_cifar100_budget_prunes_nothing_at_vb_lr_mult_1():
    """ibm_cifar100.py's budget is ~200 Adam steps a task (10 epochs of 5,000 images at batch 256): at
    the authors' one learning rate log alpha cannot climb from -10 to 0 and every weight is kept; the
    same steps at vb_lr_mult=50 prune. One digits task of ~290 images at batch 8 for 6 epochs is ~216
    steps."""
    ibm_cifar100, _ = _experiments()
    dens = {}
    for mult in (1, 50):
        cfg = _experiment_on_digits(ibm_cifar100.get_config(),
                                    ["train.epochs=6", "train.batch_size=8", f"ibm.vb_lr_mult={mult}"])
        out = isolation_run("ibm", cfg=cfg, num_tasks=1)
        dens[mult] = out["report"]["mask_density"][0]
    assert dens[1] == 1.0 and dens[50] < 0.9, dens


def test_authors_fwt_is_minus_the_random_networks_accuracy():
    """Their forgetting() zero-pads the rows before forward_transfer reads results[c-1][c]."""
    from clax.metrics import fwt
    from clax.methods.ibm import authors_fwt

    A = np.array([[80.0, 30.0, 20.0], [79.0, 85.0, 40.0], [78.0, 84.0, 90.0]])
    b = np.array([10.0, 12.0, 8.0])
    assert authors_fwt(A, b) == pytest.approx(-(12.0 + 8.0) / 2)
    assert fwt(A, b) == pytest.approx(((30.0 - 12.0) + (40.0 - 8.0)) / 2)  # GEM's, for contrast
    nan_above = np.where(np.tril(np.ones((3, 3))) > 0, A, np.nan)  # clax's matrix of an isolation method
    assert authors_fwt(nan_above, b) == authors_fwt(A, b)
    with pytest.raises(ValueError, match="authors_fwt"):
        authors_fwt(A, b[:2])


@pytest.mark.parametrize("stem, side", [("cifar", 32), ("imagenet", 8), ("imagenet-nomaxpool", 16)])
def test_resnet_stem_halves_the_input_once_without_max_pool(stem, side):
    """IBM's TinyImageNet stem (backbone/ResNet18_IB.py conv7x7: stride 2, padding 3, no pooling)
    halves a 32x32 input once (16x16 into layer 1); torchvision's stem with max-pool twice."""
    from clax.models.resnet import ResNet18

    net = ResNet18(nf=2, stem=stem)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda k: net.init(k, x), jax.random.PRNGKey(0))
    assert variables["params"]["resnet"]["conv1"]["kernel"].shape == ((3, 3) if stem == "cifar" else (7, 7)) + (3, 2)
    _, inter = jax.eval_shape(lambda v: net.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
                              variables)
    assert inter["intermediates"]["resnet"]["layer1_0"]["__call__"][0].shape == (1, side, side, 2)
    with pytest.raises(ValueError, match="imagenet-nomaxpool"):
        ResNet18(nf=2, stem="bad").init(jax.random.PRNGKey(0), x)


if __name__ == "__main__":  # the ResNet-18 path (per-task BatchNorm), too slow for the suite on CPU
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import ibm_cifar100

    from clax.config import apply_overrides

    from clax.data.pipeline import DATA_DEFAULTS
    cfg = apply_overrides({**ibm_cifar100.get_config(), "benchmark": "split-digits", "data": dict(DATA_DEFAULTS)},
                          ["backbone.nf=2", "train.epochs=1", "train.batch_size=32", "ibm.svd_samples=16"])
    assert_isolation(isolation_run("ibm", cfg=cfg, num_tasks=2))
    print("ResNet-18 with per-task BatchNorm: zero forgetting bit-for-bit")
