"""H-score and the H-embedding solve."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.transforms import hscore as HS


def _numpy_hscore(f, y):
    f = f.astype(np.float64)
    cov_f = np.cov(f, rowvar=False, bias=True)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    cov_g = np.cov(g, rowvar=False, bias=True)
    return float(np.trace(np.linalg.pinv(cov_f) @ cov_g))


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    f = rng.normal(size=(300, 6)) + 1.5 * rng.normal(size=(4, 6))[y]
    return f.astype(np.float32), y


def test_hscore_equals_direct_numpy_evaluation(feats):
    f, y = feats
    got = float(HS.hscore(f, y, 4))
    want = _numpy_hscore(f, y)
    assert want > 0.5  # separable classes give a clearly positive score
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_hscore_invariant_to_invertible_linear_map(feats):
    f, y = feats
    a = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32) + 3 * np.eye(6, dtype=np.float32)
    assert abs(np.linalg.det(a)) > 1e-2
    np.testing.assert_allclose(float(HS.hscore(f @ a, y, 4)), float(HS.hscore(f, y, 4)), rtol=1e-3)


def test_hscore_weights_drop_padded_samples(feats):
    f, y = feats
    fp = np.concatenate([f, 100 * np.ones((20, 6), np.float32)])
    yp = np.concatenate([y, np.zeros(20, y.dtype)])
    w = np.r_[np.ones(300), np.zeros(20)]
    np.testing.assert_allclose(float(HS.hscore(fp, yp, 4, w)), float(HS.hscore(f, y, 4)), rtol=1e-4)


def test_distances_direct_and_reciprocal_order():
    h = jnp.array([1.0, 3.0, 2.0, 99.0])
    valid = jnp.array([True, True, True, False])
    d = np.asarray(HS.distances(h, valid, "direct"))
    np.testing.assert_allclose(d, [3.1, 1.1, 2.1, 0.0], rtol=1e-6)  # (max - H) + 0.1 + min
    r = np.asarray(HS.distances(h, valid, "reciprocal"))
    np.testing.assert_allclose(r[:3], 1 / (np.array([1.0, 3.0, 2.0]) - 1.0 + 0.1), rtol=1e-6)
    with pytest.raises(ValueError, match="distance_form"):
        HS.distances(h, valid, "cosine")


def test_solve_embedding_meets_target_distances():
    emb = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [9.0, 9.0]])
    valid = jnp.array([True, True, True, False])
    e_true = jnp.array([1.0, 0.0])  # the targets are its distances halved: reachable with s = 2
    d = jnp.concatenate([jnp.linalg.norm(emb[:3] - e_true, axis=1) / 2.0, jnp.zeros(1)])
    e, s = jax.jit(HS.solve_embedding, static_argnames=("steps",))(jax.random.PRNGKey(0), d, emb, valid,
                                                                     steps=6000, lr=1e-2)
    fit = np.abs(float(s) * np.asarray(d[:3]) - np.linalg.norm(np.asarray(emb[:3] - e), axis=1)).sum()
    assert fit < 0.05, (e, s, fit)
    assert float(s) != 1.0  # three earlier tasks: the scale is learned


def test_solve_embedding_keeps_scale_one_with_a_single_earlier_task():
    emb = jnp.array([[0.0, 0.0], [5.0, 5.0]])
    valid = jnp.array([True, False])
    e, s = HS.solve_embedding(jax.random.PRNGKey(0), jnp.array([0.5, 0.0]), emb, valid, steps=500, lr=1e-2)
    assert float(s) == 1.0
    assert abs(float(jnp.linalg.norm(e - emb[0])) - 0.5) < 0.05


def test_warmup_weight():
    assert [float(HS.warmup_weight(t)) for t in (0, 1, 2, 10, 30)] == pytest.approx([0, 0, 0.1, 0.5, 1.0])
