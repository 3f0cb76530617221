"""The variational IB mask and the consolidation pieces on hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.transforms import consolidation
from clax.transforms import variational_mask as vm


def test_kl_on_hand_computed_values():
    # 0.5 * (log(1 + 1/1) + log(1 + 0.25/0.25) + log(1 + 4/e^-2)) by hand
    mu = jnp.array([1.0, 0.5, 2.0])
    log_d = jnp.array([0.0, math.log(0.25), -2.0])
    want = 0.5 * (math.log(2.0) + math.log(2.0) + math.log(1 + 4 * math.exp(2.0)))
    np.testing.assert_allclose(float(vm.kl(mu, log_d)), want, rtol=1e-6)
    # the per-layer ratio weighs each layer's term
    tree_mu, tree_d = {"a": mu, "b": jnp.array([[1.0]])}, {"a": log_d, "b": jnp.array([[0.0]])}
    got = vm.total_kl(tree_mu, tree_d, {"a": 0.5, "b": 2.0})
    np.testing.assert_allclose(float(got), 0.5 * want + 2.0 * 0.5 * math.log(2.0), rtol=1e-6)


def test_mask_rule_log_alpha_below_zero():
    mu = jnp.array([0.1, 0.001, 1.0, 0.0])
    log_d = jnp.array([-10.0, -10.0, 0.5, -10.0])
    # log alpha = logD - log(mu^2): -10 + 4.605 < 0 kept; -10 + 13.8 > 0 dropped; 0.5 - 0 > 0 dropped;
    # mu = 0 gives logD - log(1e-8) = 8.4 > 0 dropped
    want_la = [-10 - math.log(0.01 + 1e-8), -10 - math.log(1e-6 + 1e-8), 0.5 - math.log(1 + 1e-8),
               -10 - math.log(1e-8)]
    np.testing.assert_allclose(np.asarray(vm.log_alpha(mu, log_d)), want_la, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(vm.mask(mu, log_d)), [True, False, False, False])
    np.testing.assert_array_equal(np.asarray(vm.mask(mu, log_d, threshold=1.0)), [True, False, True, False])
    np.testing.assert_allclose(np.asarray(vm.zscale(mu, log_d)), np.asarray(mu) + np.exp(np.asarray(log_d) / 2),
                               rtol=1e-6)


def test_init_and_noisy_forward_statistics():
    w = {"k": jnp.zeros((200, 100))}
    p = vm.init(jax.random.PRNGKey(0), w)
    assert abs(float(p["mu"]["k"].mean()) - 1.0) < 1e-3 and abs(float(p["mu"]["k"].std()) - 0.01) < 1e-3
    assert abs(float(p["logD"]["k"].mean()) + 10.0) < 1e-3 and abs(float(p["logD"]["k"].std()) - 0.01) < 1e-3
    # z = mu + eps * exp(logD / 2): with logD = log(0.04) the noise has std 0.2 around mu
    z = vm.sample_z(jax.random.PRNGKey(1), {"k": jnp.full((200, 100), 3.0)}, {"k": jnp.full((200, 100), math.log(0.04))})
    assert abs(float(z["k"].mean()) - 3.0) < 0.01 and abs(float(z["k"].std()) - 0.2) < 0.01


def test_svd_ratio_counts_components_reaching_the_variance():
    # centred orthogonal columns with variances 400 : 4 : 0 : 0 -> the first reaches 99% of the variance
    f = np.array([[10, 1, 0, 0], [-10, 1, 0, 0], [10, -1, 0, 0], [-10, -1, 0, 0]], np.float32) + 5.0
    assert vm.svd_ratio(f, 0.97) == 0.25
    assert vm.svd_ratio(f, 0.995) == 0.5
    # channels-last feature maps [N, H, W, C] are flattened over N, H, W
    assert vm.svd_ratio(f.reshape(1, 2, 2, 4), 0.97) == 0.25


def test_consolidation_union_reinit_and_capacity():
    a = {"k": jnp.array([True, False, False, False])}
    b = {"k": jnp.array([False, True, False, False])}
    u = consolidation.consolidate(a, b)
    np.testing.assert_array_equal(np.asarray(u["k"]), [True, True, False, False])
    old, fresh = {"k": jnp.arange(4.0)}, {"k": -jnp.ones(4)}
    np.testing.assert_array_equal(np.asarray(consolidation.reinit_free(old, fresh, u)["k"]), [0, 1, -1, -1])
    rep = consolidation.capacity_report([a, b, a])
    assert rep == {"mask_density": [0.25, 0.25, 0.25], "capacity_used": [0.25, 0.5, 0.5]}


def test_layer_filter_matching_nothing_names_it():
    params = {"fc0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match="'conv'"):
        consolidation.split_weights(params, "conv")
    masked, rest = consolidation.split_weights(params, "kernel$")
    assert list(masked["fc0"]) == ["kernel"] and list(rest["fc0"]) == ["bias"]


def test_transforms_import_on_their_own():
    """Each transform module imports first in a fresh interpreter (no cycle through clax.methods)."""
    import subprocess
    import sys

    for mod in ("clax.transforms.classifier", "clax.transforms.consolidation", "clax.transforms.variational_mask"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
        assert r.returncode == 0, f"import {mod} alone failed:\n{r.stderr[-800:]}"
