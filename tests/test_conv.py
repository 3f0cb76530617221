"""clax.models.conv: lax.conv_general_dilated's values and derivatives, bit for bit, with the weight
gradient reading the stored input through a conditional on the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import clax.models.resnet as resnet
from clax.models.conv import conv_general_dilated, hold

DN = ("NHWC", "HWIO", "NHWC")
# (kernel, window_strides, padding, feature_group_count)
CASES = [((3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), 1),
         ((3, 3, 4, 6), (2, 2), [(1, 1), (1, 1)], 1),
         ((1, 1, 4, 6), (2, 2), "VALID", 1),
         ((3, 3, 2, 4), (1, 1), "SAME", 2)]


def _pair(kernel, strides, padding, groups):
    def ours(x, w):
        return conv_general_dilated(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)
    return ours, ref


def _inputs(kernel):
    rng = np.random.default_rng(0)
    cin = kernel[2] * (2 if kernel[3] == 4 and kernel[2] == 2 else 1)
    x = jnp.asarray(rng.normal(size=(3, 8, 8, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
    return x, w


def _loss(conv):
    # The conv's input is an element-wise chain, as in a ResNet (what XLA would otherwise recompute).
    return lambda x, w: jnp.sum(jnp.tanh(conv(jax.nn.relu(x * 1.5 + 0.25), w)) ** 2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-s{c[1][0]}-{c[2]}-g{c[3]}")
def test_values_and_derivatives_equal_lax(case):
    ours, ref = _pair(*case)
    x, w = _inputs(case[0])
    np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(ref)(x, w))
    g_ours = jax.jit(jax.grad(_loss(ours), argnums=(0, 1)))(x, w)
    g_ref = jax.jit(jax.grad(_loss(ref), argnums=(0, 1)))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_array_equal(a, b)
    # forward mode (SupSup's entropy rule takes jax.jacfwd through the backbone)
    d = jnp.ones_like(w)
    t_ours = jax.jit(lambda x, w: jax.jvp(lambda v: _loss(ours)(x, v), (w,), (d,))[1])(x, w)
    t_ref = jax.jit(lambda x, w: jax.jvp(lambda v: _loss(ref)(x, v), (w,), (d,))[1])(x, w)
    np.testing.assert_array_equal(t_ours, t_ref)


def test_weight_gradient_reads_through_a_conditional_on_cpu_only_when_needed():
    ours, _ = _pair(*CASES[0])
    x, w = _inputs(CASES[0][0])
    loss = _loss(ours)
    with_w = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    x_only = jax.jit(jax.grad(loss, argnums=0)).lower(x, w).compile().as_text()
    # a frozen kernel (no tangent) adds no conditional; a trained one adds one on the CPU
    assert "conditional(" not in x_only
    assert ("conditional(" in with_w) == (jax.default_backend() == "cpu")


def test_hold_is_the_identity_under_nan():
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(jax.jit(hold)(x, jnp.array([jnp.nan])), x)
    np.testing.assert_array_equal(jax.jit(hold)(x, jnp.array([1.0])), x)


def test_resnet18_train_gradients_equal_plain_lax(monkeypatch):
    model = resnet.ResNet18(nf=12)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)

    def grads():
        def loss(p):
            f, upd = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(f ** 2), upd
        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    ours = grads()
    monkeypatch.setattr(resnet, "conv_general_dilated", lax.conv_general_dilated)
    ref = grads()
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


def test_hold_is_staged_out_for_the_cpu_only():
    # lowered for each platform without its device (jax.export): the barrier branch exists only on the CPU
    from jax import export
    ours, _ = _pair(*CASES[0])
    x, w = _inputs(CASES[0][0])
    g = jax.jit(jax.grad(_loss(ours), argnums=1))
    for platform, barriers in (("cpu", 1), ("cuda", 0), ("tpu", 0)):
        text = export.export(g, platforms=[platform])(x, w).mlir_module()
        assert ("optimization_barrier" in text) == bool(barriers), platform
