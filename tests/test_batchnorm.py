"""BatchNorm statistics of the tested network: the refresh transform, and IBM / PackNet / WSN storing the
statistics of their test-time weights (not of the noisy or unpruned training weights)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.data import get_benchmark
from clax.methods import get_method
from clax.models import from_module
from clax.partition import task_row
from clax.train import TrainConfig, fit, make_context
from clax.transforms import batchnorm
from clax.transforms import variational_mask as vm


class BNMLP(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense -> BatchNorm -> ReLU: the smallest backbone with BatchNorm."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, h in enumerate((24, 16)):
            x = nn.Dense(h, name=f"fc{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x)
            x = nn.relu(x)
        return x


def _first_layer_stats(params, x, batch_size):
    """bn0's statistics written independently: per full batch, mean and (biased) variance of x @ W + b,
    averaged over the batches (the last one wrapping around)."""
    h = np.asarray(x, np.float64) @ np.asarray(params["fc0"]["kernel"], np.float64) + np.asarray(params["fc0"]["bias"])
    n = len(h)
    means, vars_ = [], []
    for s in range(0, n, batch_size):
        hb = h[np.arange(s, s + batch_size) % n]
        means.append(hb.mean(0))
        vars_.append(hb.var(0))
    return np.mean(means, 0), np.mean(vars_, 0)


def test_full_batches_wrap_around_and_cover_every_sample():
    b = batchnorm.full_batches(10, 4)
    assert [x.tolist() for x in b] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert [x.tolist() for x in batchnorm.full_batches(3, 8)] == [[0, 1, 2]]


def test_refresh_gives_the_average_batch_statistics_of_the_given_network():
    bb = from_module("bnmlp", BNMLP(), (8,), "flat")
    params, stats = bb.init(jax.random.PRNGKey(0))
    stats = jax.tree.map(lambda a: a + 5.0, stats)  # stale statistics: must not leak into the result
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    new = batchnorm.make_refresh(bb.apply)(params, stats, x, 16)
    mean, var = _first_layer_stats(params, x, 16)
    np.testing.assert_allclose(new["bn0"]["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["bn0"]["var"], var, rtol=1e-4, atol=1e-5)
    assert batchnorm.make_refresh(bb.apply)(params, {}, x, 16) == {}


@pytest.fixture(scope="module")
def stream():
    bench = get_benchmark("split-digits", seed=0)
    bench = type(bench)(bench.name, bench.tasks[:2], bench.num_classes, bench.input_shape)
    ctx = make_context(from_module("bnmlp", BNMLP(), bench.input_shape, "flat"), bench, "til")
    return bench, ctx


def _run(stream, method, **settings):
    bench, ctx = stream
    meth = get_method(method, ctx, **settings)
    logits = []

    def on_task_end(t, ts, A):
        x = jnp.asarray(bench.tasks[0].x_test)
        logits.append(np.asarray(meth.predict(ts.cl, x, jnp.zeros(x.shape[0], jnp.int32))))

    cfg = TrainConfig(epochs=2, lr=3e-3, batch_size=32, seed=0)
    out = fit(meth, ctx, bench, cfg, progress=False, on_task_end=on_task_end)
    out.update(method=meth, logits=logits, cfg=cfg)
    return out


@pytest.fixture(scope="module")
def ibm_out(stream):
    return _run(stream, "ibm")


def test_ibm_stores_the_statistics_of_its_test_time_weights(stream, ibm_out):
    """Row t holds bn0's statistics of W * zscale_t * mask_t on task t's training inputs: on today's
    code (running averages of the noisy, unpruned training weights) this fails."""
    bench, ctx = stream
    cl, s = ibm_out["state"].cl, {"vb_lr_mult": 50.0}
    for t in range(2):
        mu = jax.tree.map(lambda a: a * s["vb_lr_mult"], task_row(cl.per_task["mu"], t))
        log_d = jax.tree.map(lambda a: a * s["vb_lr_mult"], task_row(cl.per_task["logD"], t))
        w = jax.tree.map(lambda a, z, m: a * z * m, cl.shared["weights"], vm.zscale(mu, log_d), vm.mask(mu, log_d))
        params = {"fc0": {"kernel": w["fc0"]["kernel"], "bias": task_row(cl.per_task["rest"], t)["fc0"]["bias"]}}
        mean, var = _first_layer_stats(params, bench.tasks[t].x_train, ibm_out["cfg"].batch_size)
        stats = task_row(cl.state["backbone"], t)
        np.testing.assert_allclose(stats["bn0"]["mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats["bn0"]["var"], var, rtol=1e-4, atol=1e-5)


def test_ibm_with_batchnorm_forgets_nothing(ibm_out):
    np.testing.assert_array_equal(ibm_out["logits"][0], ibm_out["logits"][1])
    assert ibm_out["bwt"] == 0.0


def test_packnet_and_wsn_store_the_statistics_of_their_final_network(stream):
    bench, ctx = stream
    for method, settings in (("packnet", {"prune_after": 5}), ("wsn", {})):  # packnet: pruned after training
        out = _run(stream, method, **settings)
        cl = out["state"].cl
        np.testing.assert_array_equal(out["logits"][0], out["logits"][1])
        t = 1
        if method == "packnet":
            m = jax.tree.map(lambda o: (o >= 1) & (o <= t + 1), cl.extra["prune"]["owner"])
        else:
            from clax.transforms import binary_mask

            m = jax.tree.map(lambda sc: binary_mask.top_fraction(sc, 0.5) > 0, cl.shared["scores"])
        kernel = cl.shared["weights"]["fc0"]["kernel"] * m["fc0"]["kernel"]
        params = {"fc0": {"kernel": kernel, "bias": task_row(cl.per_task["rest"], t)["fc0"]["bias"]}}
        mean, var = _first_layer_stats(params, bench.tasks[t].x_train, out["cfg"].batch_size)
        stats = task_row(cl.state["backbone"], t)
        np.testing.assert_allclose(stats["bn0"]["mean"], mean, rtol=1e-4, atol=1e-5, err_msg=method)
        np.testing.assert_allclose(stats["bn0"]["var"], var, rtol=1e-4, atol=1e-5, err_msg=method)


def test_batch_mode_normalises_test_batches_with_their_own_statistics(stream, ibm_out):
    bench, ctx = stream
    meth = get_method("ibm", ctx, bn="batch")
    cl = ibm_out["state"].cl
    x = jnp.asarray(bench.tasks[0].x_test[:40])
    tid = jnp.zeros(40, jnp.int32)
    cl_stale = cl.replace(state={**cl.state, "backbone": jax.tree.map(lambda a: a + 3.0, cl.state["backbone"])})
    # the stored statistics play no part: the same logits with stale ones
    np.testing.assert_array_equal(meth.predict(cl, x, tid), meth.predict(cl_stale, x, tid))
    # and a sample's logits depend on the rest of its batch
    assert not np.allclose(meth.predict(cl, x, tid)[:20], meth.predict(cl, x[:20], tid[:20]))


@pytest.mark.parametrize("method", ["ibm", "packnet", "wsn"])
def test_a_bad_bn_mode_is_refused_by_name(stream, method):
    with pytest.raises(ValueError, match=f"{method}.bn must be one of refresh, batch, running"):
        get_method(method, stream[1], bn="nope")
