"""Binary masks from scores: keep the top ``c`` fraction of ``|scores|``, straight-through gradient (WSN).

Shared by WSN and the binary Soft-TF variant. Stored masks are bit-packed (one bit per weight).
WSN's pieces: :func:`top_c`, the mask of its masked network (top-c of one live score tensor per
weight in training, the task's stored mask at test time), and :func:`packed`, the transform that stores
each task's mask bit-packed at the task's end.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from clax.compose import Transform, state
from clax.transforms import consolidation


def check_fraction(name: str, c: float) -> float:
    """Validates a kept fraction or sparsity in the open interval (0, 1)."""
    if not 0.0 < float(c) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {c}")
    return float(c)


def kept_count(n: int, c: float) -> int:
    """How many of ``n`` scores a kept fraction ``c`` keeps, by the authors' WSN rule: their
    ``percentile`` takes the ``k``-th smallest score with
    ``k = 1 + round(0.01 (100 (1 - c)) (n - 1))`` (Python's round, their float expression) and keeps
    the scores at or above it, i.e. ``n - k + 1`` of them (more where scores tie at the threshold). ``round(c * n)`` can differ from this by one."""
    k = 1 + round(0.01 * float((1.0 - float(c)) * 100) * (int(n) - 1))  # their float expression, exactly
    return int(n) - k + 1


def top_fraction(scores: jax.Array, c: float) -> jax.Array:
    """Float mask with 1 where ``|scores|`` is among the top ``c`` fraction of its tensor.

    As the authors' WSN (``GetSubnetFaster`` over ``percentile``): the threshold is the
    :func:`kept_count`-th largest ``|score|``, and every score at or above it is kept, ties included.
    """
    flat = jnp.abs(scores).ravel()
    k = max(1, kept_count(flat.size, c))
    # the k-th largest |score|, as the minimum of the top k gathered by index: the same value as
    # top_k's last value, but XLA on CPU runs this form in about half the time (6.8 against 13.6 ms on
    # a 256 x 256 layer)
    threshold = jnp.min(flat[jax.lax.top_k(flat, k)[1]])
    return (jnp.abs(scores) >= threshold).astype(scores.dtype)


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
    """``hard`` in the forward pass, identity gradient to ``soft`` in the backward pass."""
    return soft + jax.lax.stop_gradient(hard - soft)


def top_fraction_ste(scores: jax.Array, c: float) -> jax.Array:
    """:func:`top_fraction` with the straight-through gradient of the authors' WSN: the mask is a
    function of ``|scores|`` whose backward pass is the identity, so the gradient that reaches a score is
    ``g * sign(score)`` (``GetSubnetFaster.backward`` returns ``g`` to ``w_m.abs()``, and autograd
    multiplies by the sign). A negative score whose weight helps thus grows in magnitude, into the mask."""
    a = jnp.abs(scores)
    return straight_through(top_fraction(scores, c), a)


def pack(mask) -> np.ndarray:
    """A boolean mask as bytes, one bit per entry (``np.packbits`` of the flattened mask)."""
    return np.packbits(np.asarray(mask, bool).ravel())


def unpack(packed: np.ndarray, shape) -> np.ndarray:
    """Inverse of :func:`pack` for a mask of ``shape``."""
    n = int(np.prod(shape))
    return np.unpackbits(np.asarray(packed, np.uint8), count=n).astype(bool).reshape(shape)


def packed_nbytes(shape) -> int:
    """Bytes that a bit-packed mask of ``shape`` occupies."""
    return -(-int(np.prod(shape)) // 8)


def init_scores(key, weights):
    """Scores of ``weights``' shapes drawn as the authors' ``kaiming_uniform_(w_m, a=sqrt(5))``:
    uniform in ``+-1/sqrt(fan_in)``, ``fan_in`` the product of a Flax kernel's dimensions but the last
    (inputs times the receptive field)."""
    leaves, treedef = jax.tree.flatten(weights)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, a in zip(keys, leaves):
        bound = 1.0 / math.sqrt(max(1, int(np.prod(a.shape[:-1]))))
        out.append(jax.random.uniform(k, a.shape, a.dtype, -bound, bound))
    return jax.tree.unflatten(treedef, out)


def packed_layout(weights) -> np.ndarray:
    """Per-layer byte offsets of the bit-packed masks of ``weights`` in one stored row."""
    sizes = [packed_nbytes(w.shape) for w in jax.tree.leaves(weights)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def stored(cl, t, name: str = "packed"):
    """Task ``t``'s mask (bool tree over ``shared["weights"]``) unpacked from row ``t`` of the
    :func:`packed` transform ``name``."""
    row = state(cl, name)[t]
    leaves, treedef = jax.tree.flatten(cl.shared["weights"])
    layout = packed_layout(cl.shared["weights"])
    out = []
    for i, w in enumerate(leaves):
        bits = jnp.unpackbits(row[layout[i]:layout[i + 1]], count=w.size)
        out.append(bits.reshape(w.shape).astype(bool))
    return jax.tree.unflatten(treedef, out)


def top_c(c: float, store: str = "packed") -> consolidation.Mask:
    """WSN's mask (:class:`~clax.transforms.consolidation.Mask`): one live score tensor per masked
    weight, ``shared["scores"]`` (drawn by :func:`init_scores` from the second half of the init key),
    trained at every position; task ``t`` trains ``W * top_fraction_ste(scores, c)`` and is tested with
    its mask as stored by the :func:`packed` transform ``store``."""
    def init(key, net):
        k_net, k_scores = jax.random.split(key)
        cl = net(k_net)
        return cl.replace(shared={**cl.shared, "scores": init_scores(k_scores, cl.shared["weights"])})

    def train(cl, t, key):
        m = jax.tree.map(lambda sc: top_fraction_ste(sc, c), cl.shared["scores"])
        return consolidation.apply_masks(cl.shared["weights"], m), {}

    def test(cl, t):
        return consolidation.apply_masks(cl.shared["weights"], stored(cl, t, store))

    return consolidation.Mask("top_c", init, train, test, lambda cl, t: stored(cl, t, store))


def packed(c: float, num_tasks: int, name: str = "packed") -> Transform:
    """WSN's per-task storage: at the end of task ``t`` the top ``c`` of ``|scores|`` is stored
    bit-packed as row ``t`` of ``cl.extra[name]`` (``uint8 [T, bytes]``, what :func:`top_c` tests with);
    ``task_bytes``: one row, the only storage per task beyond the per-task rows (no scores per task)."""
    def init(key, cl):
        return jnp.zeros((num_tasks, int(packed_layout(cl.shared["weights"])[-1])), jnp.uint8)

    def end_task(cl, data):
        m = jax.tree.map(lambda sc: top_fraction(sc, c) > 0, cl.shared["scores"])
        row = np.concatenate([pack(a) for a in jax.tree.leaves(m)])
        return cl.replace(extra={**cl.extra, name: state(cl, name).at[data.t].set(jnp.asarray(row))})

    return Transform(name, init=init, end_task=end_task, task_bytes=lambda cl, t: int(state(cl, name).shape[1]),
                     scenarios=("til",))
