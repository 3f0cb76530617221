import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.transforms.binary_mask import check_fraction, pack, packed_nbytes, top_fraction, top_fraction_ste, unpack


def test_top_fraction_keeps_exactly_the_largest_magnitudes():
    s = jnp.array([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    m = top_fraction(s, 0.5)
    assert m.tolist() == [[0, 1, 1], [1, 0, 0]]


def test_straight_through_gradient_is_identity_to_the_scores():
    s = jnp.array([0.3, -1.0, 2.0, 0.1])
    g = jax.grad(lambda s: jnp.sum(top_fraction_ste(s, 0.5) * jnp.array([1.0, 2.0, 3.0, 4.0])))(s)
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0, 4.0])


def test_pack_round_trips_one_bit_per_entry():
    m = np.random.default_rng(0).random((7, 5, 3)) > 0.5
    p = pack(m)
    assert p.nbytes == packed_nbytes(m.shape) == 14
    np.testing.assert_array_equal(unpack(p, m.shape), m)


@pytest.mark.parametrize("c", [0.0, 1.0, -0.1, 1.5])
def test_fractions_outside_the_open_unit_interval_are_refused_by_name(c):
    with pytest.raises(ValueError, match="wsn.sparsity must be in \\(0, 1\\)"):
        check_fraction("wsn.sparsity", c)
