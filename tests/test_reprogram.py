"""Channel-wise reprogramming and per-task BatchNorm as transforms of a backbone's apply."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.models import get_backbone
from clax.transforms import reprogram


@pytest.fixture(scope="module")
def resnet():
    bb = get_backbone("resnet18", (32, 32, 3), nf=4)
    params, stats = jax.jit(bb.init)(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3))
    return bb, params, stats, x


def test_dirac_reprogramming_leaves_output_unchanged(resnet):
    bb, params, stats, x = resnet
    kernels = reprogram.init(params, num_tasks=2)
    run = jax.jit(lambda k: reprogram.reprogrammed(bb.apply, k, jnp.int32(1))(params, stats, x, False)[0])
    plain = jax.jit(lambda: bb.apply(params, stats, x, False)[0])()
    np.testing.assert_allclose(run(kernels), plain, rtol=0, atol=1e-6)
    # and a non-identity kernel does change it (the interceptor really runs)
    out2 = run(jax.tree.map(lambda k: k * 1.5, kernels))
    assert np.abs(np.asarray(out2) - np.asarray(plain)).max() > 1e-3


def test_wraps_only_convs_larger_than_1x1_unless_full(resnet):
    _, params, _, _ = resnet
    convs = reprogram.conv_paths(params)
    full = reprogram.conv_paths(params, full=True)
    assert all("downsample" not in p for p in convs)
    assert {p for p in full if "downsample" in p} and set(convs) < set(full)
    # 1 stem + 16 block convs of ResNet-18; kernels [T, 3, 3, C]
    assert len(convs) == 17
    k = reprogram.init(params, 3)["resnet.layer2_0.conv1"]
    assert k.shape == (3, 3, 3, 8) and float(k[:, 1, 1].min()) == 1.0 and float(jnp.abs(k).sum()) == 3 * 8


def test_per_sample_task_ids_match_per_task_rows(resnet):
    bb, params, stats, x = resnet
    kernels = jax.tree.map(lambda k: k + 0.1 * jax.random.normal(jax.random.PRNGKey(2), k.shape),
                           reprogram.init(params, 3))
    tid = jnp.array([2, 0, 1])
    run = jax.jit(lambda x, t: reprogram.reprogrammed(bb.apply, kernels, t)(params, stats, x, False)[0])
    mixed = run(x, tid)
    for b in range(3):
        np.testing.assert_allclose(mixed[b], run(x, jnp.full((3,), tid[b]))[b], atol=1e-5)


def test_task_batchnorm_matches_flax_batchnorm(resnet):
    bb, params, stats, x = resnet
    bn_p, bn_s = reprogram.init_batchnorm(params, stats, 2)
    run = lambda p, x, train: bb.module.apply({"params": p}, x, train=train)
    ref, ref_stats = jax.jit(lambda: bb.apply(params, stats, x, True))()
    out, new = jax.jit(lambda: reprogram.task_batchnorm(run, bn_p, bn_s, jnp.int32(0))(params, x, True))()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(new["resnet.layer1_0.bn1"]["mean"], ref_stats["resnet"]["layer1_0"]["bn1"]["mean"],
                               atol=1e-6)
    ev, none = jax.jit(lambda: reprogram.task_batchnorm(run, bn_p, bn_s, jnp.int32(1))(params, x, False))()
    np.testing.assert_allclose(ev, jax.jit(lambda: bb.apply(params, stats, x, False)[0])(), atol=1e-5)
    assert none == {}


def test_depthwise_equals_torch_conv2d():
    torch = pytest.importorskip("torch", reason="torch is not installed; the PyTorch comparison needs it")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 6, 5)).astype(np.float32)
    k = rng.normal(size=(3, 3, 5)).astype(np.float32)
    conv = torch.nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(k.transpose(2, 0, 1)[:, None]))
        ref = conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(reprogram.depthwise(jnp.asarray(x), jnp.asarray(k))), ref, atol=1e-5)


def test_bad_kernel_size_and_no_conv_are_errors(resnet):
    _, params, _, _ = resnet
    with pytest.raises(ValueError, match="kernel_size"):
        reprogram.init(params, 2, kernel_size=2)
    with pytest.raises(ValueError, match="no convolution"):
        reprogram.init({"dense": {"kernel": jnp.ones((3, 4))}}, 2)


def test_train_rows_scalar_tid_is_the_all_rows_of_t_branch_without_dispatch():
    """frozen.train_rows with a scalar tid (every row task t's) gives exactly the logits and state of
    ``[B]`` ids all equal to t, and traces no per-row dispatch (no cond, no map over tasks)."""
    from clax.transforms.frozen import train_rows

    w = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 4))  # a per-task linear "network"

    def run(cl, x, s, train):
        return x @ cl["w"][s], {"n": cl["n"] + 1}

    cl = {"w": w, "n": jnp.int32(0)}
    x = jax.random.normal(jax.random.PRNGKey(4), (6, 5))
    t = jnp.int32(1)
    a = train_rows(run, cl, x, t, t, 3)
    b = train_rows(run, cl, x, jnp.full((6,), 1), t, 3)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    prims = lambda tid: {e.primitive.name for e in jax.make_jaxpr(lambda cl: train_rows(run, cl, x, tid, t, 3))(cl).eqns}
    assert "cond" not in prims(t) and "cond" in prims(jnp.full((6,), 1))
    # rows of another task (rehearsal) are scored under their own task's row
    mixed = train_rows(run, cl, x, jnp.array([1, 1, 0, 2, 1, 0]), t, 3)[0]
    np.testing.assert_allclose(mixed[3], x[3] @ w[2], rtol=1e-6)
