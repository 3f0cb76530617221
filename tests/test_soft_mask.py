"""Per-task soft masks on the weights a path filter selects."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.methods.soft_tf import block_filter
from clax.models import get_backbone
from clax.transforms import soft_mask


@pytest.fixture(scope="module")
def vit():
    bb = get_backbone("vit", (32, 32, 3), depth=3, dim=16, heads=2)
    params, stats = jax.jit(bb.init)(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    return bb, params, stats, x


def test_mask_of_ones_leaves_output_unchanged(vit):
    bb, params, stats, x = vit
    masks = soft_mask.init(jax.random.PRNGKey(2), params, block_filter(params, 3), 2)
    ones = jax.tree.map(jnp.ones_like, soft_mask.row(masks, 0))
    run = jax.jit(lambda p: bb.apply(p, stats, x, False)[0])
    out = run(soft_mask.apply(params, ones))
    np.testing.assert_array_equal(out, run(params))
    # the init (U[0.99, 1]) does change it, a little
    out2 = run(soft_mask.apply(params, soft_mask.row(masks, 0)))
    assert 0 < np.abs(np.asarray(out2 - out)).max() < 0.5


def test_filter_selects_last_blocks_and_init_range(vit):
    _, params, _, _ = vit
    masks = soft_mask.init(jax.random.PRNGKey(2), params, block_filter(params, 2), 3)
    assert sorted(masks) == sorted(f"blocks_{b}.{m}.kernel" for b in (1, 2)
                                   for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    m = masks["blocks_2.attn.qkv.kernel"]
    assert m.shape == (3,) + params["blocks_2"]["attn"]["qkv"]["kernel"].shape
    assert 0.99 <= float(m.min()) and float(m.max()) <= 1.0


def test_filter_matching_nothing_names_it(vit):
    _, params, _, _ = vit
    with pytest.raises(ValueError, match="'blocks_9/attn'"):
        soft_mask.init(jax.random.PRNGKey(0), params, "blocks_9/attn", 2)
    with pytest.raises(ValueError, match="masked_blocks"):
        block_filter(params, 4)


def test_superimpose_and_quantize():
    m = {"w": jnp.stack([jnp.full((2, 2), 1.0), jnp.full((2, 2), 3.0)])}
    np.testing.assert_allclose(soft_mask.superimpose(m, jnp.array([0.5, 0.5]))["w"], 2.0)
    x = jax.random.uniform(jax.random.PRNGKey(0), (100,), minval=0.9, maxval=1.1)
    for prec, tol in (("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 0.2 / 255)):
        assert float(jnp.abs(soft_mask.quantize(x, prec) - x).max()) <= tol
    assert soft_mask.stored_nbytes((10, 10), "float16") == 200 and soft_mask.stored_nbytes((10, 10), "int8") == 108
    with pytest.raises(ValueError, match="float8"):
        soft_mask.quantize(x, "float8")


def _eager_quantize(mask, precision):
    """The eager jnp formula ``quantize`` computed before it moved to numpy (each op dispatched alone)."""
    if precision == "int8":
        lo, hi = jnp.min(mask), jnp.max(mask)
        step = jnp.where(hi > lo, (hi - lo) / 255.0, 1.0)
        return lo + jnp.round((mask - lo) / step) * step
    return mask.astype(jnp.dtype(precision)).astype(jnp.float32)


def test_quantize_on_host_is_eager_jax_bit_for_bit():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    rows = jax.random.uniform(k1, (3, 17, 5), minval=0.5, maxval=1.5)
    # exact ties of the int8 rounding: lo 0, step 1, so (m - lo) / step lands on .5 and rounds half to even
    ties = jnp.concatenate([jnp.array([0.0, 255.0, 0.5, 1.5, 2.5, 254.5]), jax.random.uniform(k2, (79,)) * 255])
    for prec in ("float16", "bfloat16", "int8"):
        for x in (rows[0], ties, jnp.full((4,), 0.7)):  # a constant tensor: step 1
            np.testing.assert_array_equal(soft_mask.quantize(x, prec), _eager_quantize(x, prec), err_msg=prec)
        # each row as its own tensor (not jax.vmap's eager version: XLA's vectorised division by 255 is
        # not correctly rounded, numpy's and the scalar one are)
        by_row = np.stack([_eager_quantize(m, prec) for m in rows])
        np.testing.assert_array_equal(soft_mask.quantize(rows, prec, batch_dims=1), by_row, err_msg=prec)
    assert not np.array_equal(soft_mask.quantize(rows, "int8", batch_dims=1), soft_mask.quantize(rows, "int8"))
