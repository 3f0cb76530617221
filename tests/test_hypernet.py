"""The hypernetwork transform: layout round-trips, chunking, generation inside jit, bad settings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax.models import get_backbone
from clax.transforms import hypernet as H


def _target_init(key):
    bb = get_backbone("mlp", (8,), hidden=[5])
    return {"backbone": bb.init(key)[0], "head": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros((3,))}}


def test_layout_round_trip_and_counts():
    lay = H.layout(_target_init, key=jax.random.PRNGKey(0))
    assert lay.num_params == 8 * 5 + 5 + 5 * 3 + 3
    tree = _target_init(jax.random.PRNGKey(3))
    back = lay.unravel(lay.ravel(tree))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), tree, back)
    # constant leaves (head kernel of ones, zero biases) get the fallback scale, others their std
    i_kernel = [j for j, s in enumerate(lay.shapes) if s == (5, 3)][0]
    assert lay.scale[i_kernel] == 0.1 and lay.shift[i_kernel] == 1.0


def test_chunked_generates_the_target_tree_inside_jit():
    lay = H.layout(_target_init, key=jax.random.PRNGKey(0))
    hn = H.chunked(lay, chunk_size=7, task_emb_dim=4, chunk_emb_dim=3, hidden=[6])
    assert hn.num_chunks == -(-lay.num_params // 7) == 9
    params = hn.init(jax.random.PRNGKey(1))
    assert params["chunk_emb"].shape == (9, 3)
    gen = jax.jit(hn.apply)(params, jnp.ones(4))
    want = jax.eval_shape(_target_init, jax.random.PRNGKey(0))
    assert jax.tree.structure(gen) == jax.tree.structure(want)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(gen), jax.tree.leaves(want)))
    # different task embeddings give different weights; gradients reach embedding and chunk embeddings
    assert not np.allclose(hn.flat(params, jnp.ones(4)), hn.flat(params, -jnp.ones(4)))
    g_e, g_p = jax.grad(lambda e, p: jnp.sum(hn.flat(p, e) ** 2), argnums=(0, 1))(jnp.ones(4), params)
    assert np.abs(g_e).sum() > 0 and np.abs(g_p["chunk_emb"]).sum() > 0


def test_plain_bias_free_head_generator():
    lay = H.layout(lambda k: {"kernel": jnp.zeros((10, 2)), "bias": jnp.zeros((2,))})
    hn = H.plain(lay, task_emb_dim=6, hidden=[16], use_bias=False)
    params = hn.init(jax.random.PRNGKey(0))
    assert all("bias" not in layer for layer in params["mlp"])
    assert hn.num_chunks == 1 and hn.flat(params, jnp.ones(6)).shape == (22,)
    # bias-free and LeakyReLU: positively homogeneous in the embedding
    np.testing.assert_allclose(hn.flat(params, 2 * jnp.ones(6)), 2 * hn.flat(params, jnp.ones(6)), rtol=1e-5)


@pytest.mark.parametrize("kwargs, needle", [
    ({"chunk_size": 0}, "hnet.chunk_size must be a positive integer, got 0"),
    ({"chunk_size": -5}, "hnet.chunk_size"),
    ({"task_emb_dim": 0}, "hnet.task_emb_dim must be a positive integer, got 0"),
    ({"chunk_emb_dim": 0}, "hnet.chunk_emb_dim"),
    ({"hidden": [10, 0]}, "hnet.hidden"),
])
def test_bad_settings_are_errors_naming_the_setting(kwargs, needle):
    lay = H.layout(_target_init)
    args = {"chunk_size": 7, "task_emb_dim": 4, "chunk_emb_dim": 3, "hidden": [6], **kwargs}
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        H.chunked(lay, **args)
    if "task_emb_dim" in kwargs:
        with pytest.raises(ValueError, match="pah.task_emb_dim"):
            H.plain(lay, 0, name="pah")
