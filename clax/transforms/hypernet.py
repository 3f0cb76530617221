"""Hypernetworks: an MLP that emits the weights of a target network from a task embedding.

* :func:`layout` works out, with :func:`jax.eval_shape`, where each leaf of the target's parameter
  pytree sits in one flat vector, and gives the ``unravel`` that rebuilds the pytree (inside jit) with
  a fixed per-leaf affine map ``offset + scale * raw`` so that a hypernetwork whose raw outputs are of
  unit scale produces weights of the target's initial scale (the role of hyperfan initialisation).
* :func:`chunked` (von Oswald et al. 2020): ``h([e; c_i]) -> chunk i``; chunk embeddings ``c_i`` are
  learned and part of the hypernetwork's parameters; the chunks are concatenated and cut to the
  target's parameter count. The chunk count depends only on the target and the chunk size, so it is
  fixed for a whole stream.
* :func:`plain`: an unchunked MLP ``h(e) -> all weights``, for small targets such as linear heads
  (PAH's bias-free LeakyReLU hypernetwork).

Both return a :class:`Hypernet`: ``init(key) -> params`` and ``apply(params, e) -> target pytree``
(with ``flat`` giving the flat vector instead and ``hidden`` the MLP's last hidden activation).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clax.models import jit_init  # the target's init: one compiled program, the eager values (tested)

PyTree = Any


class Layout(NamedTuple):
    """Where a target pytree's leaves sit in one flat vector.

    Attributes:
      num_params: total number of entries.
      treedef: the target's tree structure.
      shapes, dtypes: per leaf.
      offsets: start of each leaf in the flat vector.
      scale, shift: per-leaf affine applied when unravelling (``shift + scale * raw``).
    """

    num_params: int
    treedef: Any
    shapes: tuple
    dtypes: tuple
    offsets: tuple
    scale: tuple
    shift: tuple

    def unravel(self, flat: jax.Array) -> PyTree:
        """The target pytree from a flat ``[num_params]`` vector (jit-safe, static slices)."""
        leaves = []
        for shp, dt, o, s, b in zip(self.shapes, self.dtypes, self.offsets, self.scale, self.shift):
            n = int(np.prod(shp, dtype=np.int64))
            leaves.append((b + s * flat[o:o + n]).reshape(shp).astype(dt))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def ravel(self, tree: PyTree) -> jax.Array:
        """Inverse of :meth:`unravel`: the raw flat vector that unravels to ``tree``."""
        leaves = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([((x - b) / s).reshape(-1) for x, s, b in zip(leaves, self.scale, self.shift)])


def layout(init_fn: Callable[[jax.Array], PyTree], key=None, min_scale: float = 0.1) -> Layout:
    """The flat layout of the pytree ``init_fn(key)`` returns.

    Shapes come from :func:`jax.eval_shape`; with a ``key`` the target is also initialised once (one
    compiled program, :func:`clax.models.jit_init`) so that each leaf's mean and standard deviation
    become its affine ``shift`` and ``scale`` (``scale`` falls back to ``min_scale`` where a leaf's
    initial values are constant, e.g. biases and BatchNorm scales). Without a key the affine is the
    identity.
    """
    shapes_tree = jax.eval_shape(init_fn, jax.random.PRNGKey(0) if key is None else key)
    leaves, treedef = jax.tree_util.tree_flatten(shapes_tree)
    sizes = [int(np.prod(x.shape, dtype=np.int64)) for x in leaves]
    offsets = tuple(int(o) for o in np.cumsum([0] + sizes[:-1]))
    if key is None:
        scale, shift = (1.0,) * len(leaves), (0.0,) * len(leaves)
    else:
        vals = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(jit_init(init_fn)(key))]
        shift = tuple(float(v.mean()) for v in vals)
        scale = tuple(float(v.std()) if v.std() > 1e-8 else min_scale for v in vals)
    return Layout(int(sum(sizes)), treedef, tuple(tuple(x.shape) for x in leaves),
                  tuple(x.dtype for x in leaves), offsets, scale, shift)


class Hypernet(NamedTuple):
    """A hypernetwork as pure functions.

    Attributes:
      init: ``key -> params``.
      flat: ``(params, e [E]) -> [num_params]``: the raw output, one vector (before the layout's affine).
      apply: ``(params, e [E]) -> target pytree`` (``layout.unravel(flat(params, e))``).
      layout: the target's :class:`Layout`.
      num_chunks: chunks per target (1 for :func:`plain`).
      chunk_size: entries per chunk (``num_params`` for :func:`plain`).
      hidden: ``(params, e [E]) -> [num_chunks, width]``: the MLP's last hidden activation for every
        chunk (after its nonlinearity), or the MLP's input (``[e; c_i]`` per chunk) where it has no
        hidden layer (what the H-embedding decoder reads, :mod:`clax.methods.hembed`).
    """

    init: Callable[[jax.Array], PyTree]
    flat: Callable[[PyTree, jax.Array], jax.Array]
    apply: Callable[[PyTree, jax.Array], PyTree]
    layout: Layout
    num_chunks: int
    chunk_size: int
    hidden: Optional[Callable[[PyTree, jax.Array], jax.Array]] = None


def mlp_init(key, sizes: Sequence[int], use_bias: bool) -> list[dict]:
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` as a list of ``{"kernel" [a, b], "bias" [b]}`` layers
    (LeCun-normal kernels, zero biases; no biases when ``use_bias`` is False)."""
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, (a, b) in zip(keys, zip(sizes[:-1], sizes[1:])):
        layer = {"kernel": jax.random.normal(k, (a, b)) / math.sqrt(a)}
        if use_bias:
            layer["bias"] = jnp.zeros((b,))
        layers.append(layer)
    return layers


def mlp_apply(layers: list[dict], x: jax.Array, act: Callable) -> jax.Array:
    """The MLP on ``x [..., sizes[0]]``; ``act`` between layers, none after the last."""
    for i, layer in enumerate(layers):
        x = x @ layer["kernel"] + (layer["bias"] if "bias" in layer else 0.0)
        if i < len(layers) - 1:
            x = act(x)
    return x


def mlp_hidden(layers: list[dict], x: jax.Array, act: Callable) -> jax.Array:
    """The MLP's last hidden activation on ``x`` (``act`` applied), or ``x`` itself for a one-layer MLP."""
    return act(mlp_apply(layers[:-1], x, act)) if len(layers) > 1 else x


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")  # e.g. hnet.chunk_size=0


def _check_hidden(name: str, hidden) -> tuple[int, ...]:
    hidden = tuple(hidden)
    for h in hidden:
        _check_positive(f"{name} (each layer)", h)
    return hidden


def chunked(lay: Layout, chunk_size: int, task_emb_dim: int, chunk_emb_dim: int,
            hidden: Sequence[int] = (100, 100), activation: Callable = jax.nn.relu,
            chunk_emb_std: float = 1.0, name: str = "hnet") -> Hypernet:
    """A chunked hypernetwork for the target described by ``lay``.

    ``params = {"mlp": [layers], "chunk_emb": [num_chunks, chunk_emb_dim]}``; chunk ``i`` is
    ``mlp([e; chunk_emb[i]])``, all chunks in one batched matmul.

    Raises:
      ValueError: a ``chunk_size`` that does not split the target into a positive number of chunks
        (zero or negative), an embedding size of zero, or a bad hidden width; the message names the
        setting (``{name}.chunk_size`` etc.).
    """
    _check_positive(f"{name}.chunk_size", chunk_size)
    _check_positive(f"{name}.task_emb_dim", task_emb_dim)
    _check_positive(f"{name}.chunk_emb_dim", chunk_emb_dim)
    hidden = _check_hidden(f"{name}.hidden", hidden)
    num_chunks = -(-lay.num_params // chunk_size)  # the last chunk is cut to the target's size
    sizes = (task_emb_dim + chunk_emb_dim, *hidden, chunk_size)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"mlp": mlp_init(k1, sizes, True),
                "chunk_emb": chunk_emb_std * jax.random.normal(k2, (num_chunks, chunk_emb_dim))}

    def inputs(params, e):
        return jnp.concatenate([jnp.broadcast_to(e, (num_chunks, task_emb_dim)), params["chunk_emb"]], axis=1)

    def flat(params, e):
        return mlp_apply(params["mlp"], inputs(params, e), activation).reshape(-1)[: lay.num_params]

    def apply(params, e):
        return lay.unravel(flat(params, e))

    def hidden_act(params, e):
        return mlp_hidden(params["mlp"], inputs(params, e), activation)

    return Hypernet(init, flat, apply, lay, num_chunks, chunk_size, hidden_act)


def plain(lay: Layout, task_emb_dim: int, hidden: Sequence[int] = (16,), use_bias: bool = False,
          activation: Callable = jax.nn.leaky_relu, name: str = "hypernet") -> Hypernet:
    """An unchunked hypernetwork ``mlp(e) -> all of the target's weights`` (``params = {"mlp": [...]}``).

    Raises:
      ValueError: ``task_emb_dim`` or a hidden width that is not a positive integer, naming the setting.
    """
    _check_positive(f"{name}.task_emb_dim", task_emb_dim)
    hidden = _check_hidden(f"{name}.hidden", hidden)
    sizes = (task_emb_dim, *hidden, lay.num_params)

    def init(key):
        return {"mlp": mlp_init(key, sizes, use_bias)}

    def flat(params, e):
        return mlp_apply(params["mlp"], e, activation)

    def apply(params, e):
        return lay.unravel(flat(params, e))

    def hidden_act(params, e):
        return mlp_hidden(params["mlp"], e[None], activation)

    return Hypernet(init, flat, apply, lay, 1, lay.num_params, hidden_act)


def generated_flat(hn: Hypernet, params: PyTree, e: jax.Array) -> jax.Array:
    """``[num_params]``: the generated weights (after the layout's affine) as one flat vector, the
    leaves concatenated in layout order; equals the raveled leaves of ``hn.apply(params, e)``."""
    scale, shift = target_affine(hn.layout)
    return shift + scale * hn.flat(params, e)


def target_affine(lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """``(scale [P], shift [P])``: the layout's per-leaf affine expanded to one value per entry."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in lay.shapes]
    return (np.repeat(np.asarray(lay.scale, np.float32), sizes), np.repeat(np.asarray(lay.shift, np.float32), sizes))
