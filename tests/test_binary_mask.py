import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.transforms.binary_mask import (check_fraction, kept_count, kth_largest, pack, packed_nbytes, top_fraction,
                                        top_fraction_ste, top_fraction_sorted, top_fractions, unpack)


def test_top_fraction_keeps_the_largest_magnitudes_by_the_authors_count():
    # 6 scores at c = 0.5: WSN's percentile takes the k-th smallest |s| with k = 1 + round(0.5 * 5) = 3
    # (0.2) and keeps every |s| >= 0.2, i.e. 4 of 6 (round(c * n) would keep 3)
    s = jnp.array([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    m = top_fraction(s, 0.5)
    assert m.tolist() == [[0, 1, 1], [1, 1, 0]]


def _authors_rule(scores, c):
    """WSN's GetSubnetFaster over percentile(|s|, 100 * (1 - c)), written from their formula."""
    a = np.abs(np.asarray(scores, np.float64)).ravel()
    k = 1 + round(0.01 * (100 * (1 - c)) * (a.size - 1))
    kth = np.sort(a)[k - 1]
    return (np.abs(np.asarray(scores)) >= kth).astype(np.float32)


@pytest.mark.parametrize("c", [0.1, 0.3, 0.5, 0.9])
def test_top_fraction_equals_the_authors_percentile_rule_ties_included(c):
    rng = np.random.default_rng(1)
    for shape in [(7,), (13, 5), (3, 3, 4, 6)]:
        s = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(top_fraction(jnp.asarray(s), c), _authors_rule(s, c))
        ties = rng.integers(-3, 4, size=shape).astype(np.float32)  # many ties at the threshold: all kept
        np.testing.assert_array_equal(top_fraction(jnp.asarray(ties), c), _authors_rule(ties, c))
    assert kept_count(4096, 0.5) == 2048 and kept_count(6, 0.5) == 4


def _cases(rng):
    """Random scores, scores with many ties, and layers of different sizes (a 1-entry layer included)."""
    shapes = [(1,), (2,), (7,), (13, 5), (3, 3, 4, 6), (256, 64), (3, 3, 16, 32)]
    out = [rng.normal(size=s).astype(np.float32) for s in shapes]
    out += [rng.integers(-3, 4, size=s).astype(np.float32) for s in shapes]  # many ties, zeros, -0.0
    out += [np.zeros((5, 4), np.float32), np.full((9,), -2.5, np.float32),  # all tied
            # (no subnormals: XLA on CPU flushes them to zero in compares, as the sort-based mask did)
            np.array([0.0, -0.0, 2e-38, -2e-38, 1.5e-38, np.inf, -np.inf, 3.4e38, 1.0, 1.0], np.float32),
            (rng.random((64, 32)) * 1e-3).astype(np.float32).round(5)]  # near-ties at a small scale
    return out


@pytest.mark.parametrize("c", [0.01, 0.1, 0.3, 0.5, 0.9, 0.99])
def test_bisection_mask_equals_the_sort_based_mask_ties_included(c):
    # top_fraction's threshold is found by a bisection on the float32 bit pattern, not a sort: the mask
    # must be the sort's (lax.top_k's) and the authors' percentile rule's, bit for bit, ties included,
    # layer by layer and with all layers' thresholds found in one loop (top_fractions)
    cases = _cases(np.random.default_rng(3))
    together = jax.jit(lambda xs: top_fractions(xs, c))([jnp.asarray(x) for x in cases])
    for x, m in zip(cases, together):
        want = np.asarray(top_fraction_sorted(jnp.asarray(x), c))
        np.testing.assert_array_equal(want, _authors_rule(x, c))
        np.testing.assert_array_equal(top_fraction(jnp.asarray(x), c), want)
        np.testing.assert_array_equal(m, want)


def test_kth_largest_is_the_sorted_value_for_every_k():
    rng = np.random.default_rng(4)
    for x in [np.abs(rng.normal(size=37)).astype(np.float32), np.abs(rng.integers(0, 4, size=37)).astype(np.float32)]:
        got = jax.jit(lambda a: kth_largest([a] * 37, list(range(1, 38))))(jnp.asarray(x))
        np.testing.assert_array_equal(np.array(got), np.sort(x)[::-1])
    # random k over scores of several kinds: uniform (WSN's initialisation), normal, ties, heavy tails
    # across many binades, half zeros; every size from 1 entry up
    f = jax.jit(lambda a, k: kth_largest([a], [k])[0], static_argnums=1)
    for trial in range(120):
        n = int(rng.choice([1, 2, 3, 7, 100, 4096, 20000]))
        x = [rng.uniform(-0.06, 0.06, n), rng.normal(size=n), rng.integers(-3, 4, n), np.exp(10 * rng.normal(size=n)),
             rng.standard_cauchy(n) * (rng.random(n) < 0.5)][trial % 5]
        a = np.abs(x.astype(np.float32))
        k = int(rng.integers(1, n + 1)) if trial % 2 else max(1, n // 2)
        assert np.float32(f(jnp.asarray(a), k)) == np.sort(a)[::-1][k - 1], (trial, n, k)
    with pytest.raises(ValueError, match="k must be in"):
        kth_largest([jnp.ones(3)], [4])


def test_straight_through_gradient_passes_through_the_absolute_value():
    # the authors' backward returns g to |s|: dL/ds = g * sign(s), so a negative score whose weight helps
    # (g > 0 on the mask) is pushed away from zero, further into the mask
    s = jnp.array([0.3, -1.0, 2.0, -0.1])
    g_out = jnp.array([1.0, 2.0, 3.0, 4.0])
    g = jax.grad(lambda s: jnp.sum(top_fraction_ste(s, 0.5) * g_out))(s)
    np.testing.assert_array_equal(g, [1.0, -2.0, 3.0, -4.0])
    np.testing.assert_array_equal(top_fraction_ste(s, 0.5), [0.0, 1.0, 1.0, 0.0])


def test_pack_round_trips_one_bit_per_entry():
    m = np.random.default_rng(0).random((7, 5, 3)) > 0.5
    p = pack(m)
    assert p.nbytes == packed_nbytes(m.shape) == 14
    np.testing.assert_array_equal(unpack(p, m.shape), m)


@pytest.mark.parametrize("c", [0.0, 1.0, -0.1, 1.5])
def test_fractions_outside_the_open_unit_interval_are_refused_by_name(c):
    with pytest.raises(ValueError, match="wsn.c must be in \\(0, 1\\)"):
        check_fraction("wsn.c", c)
