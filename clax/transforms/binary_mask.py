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


def _count_at_least(bits: jax.Array, cand: jax.Array) -> jax.Array:
    """How many entries of ``bits`` are ``>= cand``: summed in float32 below 2**24 entries (exact there:
    every partial sum is an integer below 2**24; XLA on CPU sums float32 about 1.5x faster than int32),
    in int32 above."""
    if bits.size < 2 ** 24:
        return jnp.sum((bits >= cand).astype(jnp.float32))
    return jnp.sum(bits >= cand, dtype=jnp.int32)


def _kth_largest_flat(a: jax.Array, k: int) -> jax.Array:
    """The ``k``-th largest of the flat non-negative float32 ``a`` (see :func:`kth_largest`)."""
    a = jnp.abs(a)  # -0.0 as +0.0: every pattern then reads as a non-negative int32
    b = jax.lax.bitcast_convert_type(a, jnp.int32)
    n = b.size

    def body(s):
        lo, hi, clo, chi, bisect = s  # invariant: clo = #(b >= lo) >= k > #(b >= hi) = chi, lo < hi
        lf, hf = (jax.lax.bitcast_convert_type(x, jnp.float32) for x in (lo, hi))
        frac = ((clo - k).astype(jnp.float32) + 0.5) / (clo - chi).astype(jnp.float32)
        v = lf + (hf - lf) * frac  # where a count linear in the value between lo and hi reaches k - 1/2
        mid = lo + (hi - lo) // 2
        cand = jnp.where(bisect | ~jnp.isfinite(v), mid, jax.lax.bitcast_convert_type(v, jnp.int32))
        cand = jnp.clip(cand, lo + 1, hi - 1)
        c = _count_at_least(b, cand).astype(jnp.int32)
        up = c >= k
        nlo, nclo = jnp.where(up, cand, lo), jnp.where(up, c, clo)
        nhi, nchi = jnp.where(up, hi, cand), jnp.where(up, chi, c)
        # an interpolation that did not halve the count between the ends is followed by a bisection
        return nlo, nhi, nclo, nchi, ~bisect & (2 * (nclo - nchi) > clo - chi)

    def cond(s):
        lo, hi, clo, chi, _ = s
        return (clo != k) & (chi != k - 1) & (hi - lo > 1)

    # float32 min and max reductions run about twice as fast as int32 ones on CPU; XLA flushes
    # subnormals there, so a subnormal maximum reads 0 (hence the smallest normal as the upper end)
    top = jnp.max(a)
    hi0 = jnp.where(top >= np.finfo(np.float32).tiny, jax.lax.bitcast_convert_type(top, jnp.int32) + 1, 0x00800000)
    init = (jnp.int32(0), hi0.astype(jnp.int32), jnp.int32(n), jnp.int32(0), jnp.bool_(False))
    lo, hi, clo, chi, _ = jax.lax.while_loop(cond, body, init)
    least_at_or_above = jnp.min(jnp.where(b >= lo, a, jnp.inf))
    greatest_below = jnp.max(jnp.where(b < hi, a, -1.0))
    # exactly k at or above lo: the k-th is the least of them; k - 1 at or above hi: the greatest below
    # hi; else hi = lo + 1 and the k-th is lo
    return jnp.where(clo == k, least_at_or_above,
                     jnp.where(chi == k - 1, greatest_below, jax.lax.bitcast_convert_type(lo, jnp.float32)))


def kth_largest(values, ks) -> list:
    """The ``ks[i]``-th largest entry of each non-negative float32 array ``values[i]``, exactly (the value
    that sorting would give, ties included), without sorting.

    For non-negative floats the bit pattern read as an int32 orders as the value, so the ``k``-th
    largest is the largest pattern ``v`` with at least ``k`` entries ``>= v``. A bracket
    ``[lo, hi)`` of patterns (first 0 and just above the maximum) with ``#(>= lo) >= k > #(>= hi)`` is
    narrowed by counting the entries at or above a candidate (one compare-and-count pass over the
    array): the candidate is where the count, taken as linear in the value between the ends, would be
    ``k - 1/2`` (regula falsi), or the middle pattern after an interpolation that did not halve the
    count between the ends. It stops when exactly ``k`` (the ``k``-th is then the least entry at or
    above ``lo``) or ``k - 1`` entries (the greatest entry below ``hi``) are at or above an end, or
    the ends are adjacent patterns (it is ``lo``), and takes the answer in one last pass. About 6
    passes on uniform scores (WSN's initialisation), 12 on normal ones, ~30 where many entries tie at
    the threshold; at most ``2 (31 + log2 n)``. ``1 <= ks[i] <= values[i].size``; NaN is not supported; a subnormal
    ``k``-th value may come back as 0 (XLA on CPU flushes subnormals), which compares the same there.
    """
    out = []
    for v, k in zip(values, ks):
        a = jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)).ravel()
        if not 1 <= int(k) <= a.size:
            raise ValueError(f"k must be in [1, {a.size}], got {k}")
        out.append(_kth_largest_flat(a, int(k)))
    return out


def top_fractions(scores: list, c: float) -> list:
    """:func:`top_fraction` of each tensor of the list ``scores`` (thresholds by :func:`kth_largest`)."""
    a = [jnp.abs(s) for s in scores]
    th = kth_largest(a, [max(1, kept_count(x.size, c)) for x in a])
    return [(x >= t).astype(s.dtype) for s, x, t in zip(scores, a, th)]


def top_fraction(scores: jax.Array, c: float) -> jax.Array:
    """Float mask with 1 where ``|scores|`` is among the top ``c`` fraction of its tensor.

    As the authors' WSN (``GetSubnetFaster`` over ``percentile``): the threshold is the
    :func:`kept_count`-th largest ``|score|``, and every score at or above it is kept, ties included.
    The threshold is found by :func:`kth_largest` (a few vectorised compare-and-count passes, no sort):
    the same value as the sort's, so the same mask.
    """
    return top_fractions([scores], c)[0]


def top_fraction_sorted(scores: jax.Array, c: float) -> jax.Array:
    """:func:`top_fraction` by the sort (the threshold as the minimum of ``lax.top_k``'s top ``k``): the
    reference that the bisection is tested against, and the former implementation (about 10x slower on CPU)."""
    flat = jnp.abs(scores).ravel()
    k = max(1, kept_count(flat.size, c))
    threshold = jnp.min(flat[jax.lax.top_k(flat, k)[1]])
    return (jnp.abs(scores) >= threshold).astype(scores.dtype)


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
    """``hard`` in the forward pass, identity gradient to ``soft`` in the backward pass."""
    return soft + jax.lax.stop_gradient(hard - soft)


def top_fractions_ste(scores: list, c: float) -> list:
    """:func:`top_fraction_ste` of each tensor of the list ``scores`` (thresholds by one :func:`top_fractions`)."""
    return [straight_through(h, jnp.abs(s)) for h, s in zip(top_fractions(scores, c), scores)]


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


def is_stored(cl, t, name: str = "packed"):
    """Whether row ``t`` of the :func:`packed` transform ``name`` holds a stored mask (``t``'s task has
    ended): a stored mask keeps at least one weight of every layer, so its row has a nonzero byte, and
    rows start all zero. A Python bool where ``t`` and the state are concrete (no XLA computation), else
    a traced bool scalar."""
    rows = state(cl, name)
    if not isinstance(t, jax.core.Tracer) and not isinstance(rows, jax.core.Tracer):
        return bool(np.any(np.asarray(rows[int(t)])))
    return jnp.any(rows[t] != 0)


def live_or_stored(cl, t, c: float, name: str = "packed"):
    """Task ``t``'s mask (bool tree over ``shared["weights"]``) as predictions use it: the stored one
    (:func:`stored`) once row ``t`` holds it (:func:`is_stored`), else, while task ``t`` trains, the
    top-``c`` of the live scores (:func:`top_fractions`, the training step's mask without its
    straight-through gradient). With a traced ``t`` one ``lax.cond`` picks the branch (shapes do not
    depend on ``t``: one compilation for every task; the live top-c runs only where taken).

    The authors' WSN validates (``mode="valid"``) with the mask of the last training forward pass,
    i.e. of the scores before the epoch's last optimizer step; clax's live mask is that of the current
    scores (the one the next step would train), so the two differ by at most one step's mask change."""
    def from_row(cl):
        return jax.tree.leaves(stored(cl, t, name))

    def live(cl):
        return [m > 0 for m in top_fractions(jax.tree.leaves(cl.shared["scores"]), c)]

    treedef = jax.tree.structure(cl.shared["weights"])
    flag = is_stored(cl, t, name)
    if isinstance(flag, bool):
        return stored(cl, t, name) if flag else jax.tree.unflatten(treedef, live(cl))
    return jax.tree.unflatten(treedef, jax.lax.cond(flag, from_row, live, cl))


def top_c(c: float, store: str = "packed") -> consolidation.Mask:
    """WSN's mask (:class:`~clax.transforms.consolidation.Mask`): one live score tensor per masked
    weight, ``shared["scores"]`` (drawn by :func:`init_scores` from the second half of the init key),
    trained at every position; task ``t`` trains ``W * top_fraction_ste(scores, c)`` and is tested with
    its mask as stored by the :func:`packed` transform ``store`` (:func:`live_or_stored`: before the
    task's end, e.g. for validation during its epochs, with the top-c of the live scores)."""
    def init(key, net):
        k_net, k_scores = jax.random.split(key)
        cl = net(k_net)
        return cl.replace(shared={**cl.shared, "scores": init_scores(k_scores, cl.shared["weights"])})

    def train(cl, t, key):
        leaves, treedef = jax.tree.flatten(cl.shared["scores"])
        m = jax.tree.unflatten(treedef, top_fractions_ste(leaves, c))
        return consolidation.apply_masks(cl.shared["weights"], m), {}

    def test(cl, t):
        return consolidation.apply_masks(cl.shared["weights"], live_or_stored(cl, t, c, store))

    return consolidation.Mask("top_c", init, train, test, lambda cl, t: stored(cl, t, store))


def packed(c: float, num_tasks: int, name: str = "packed") -> Transform:
    """WSN's per-task storage: at the end of task ``t`` the top ``c`` of ``|scores|`` is stored
    bit-packed as row ``t`` of ``cl.extra[name]`` (``uint8 [T, bytes]``, what :func:`top_c` tests with);
    ``task_bytes``: one row, the only storage per task beyond the per-task rows (no scores per task)."""
    def init(key, cl):
        return jnp.zeros((num_tasks, int(packed_layout(cl.shared["weights"])[-1])), jnp.uint8)

    def end_task(cl, data):
        m = top_fractions(jax.tree.leaves(cl.shared["scores"]), c)
        row = np.concatenate([pack(a > 0) for a in m])
        return cl.replace(extra={**cl.extra, name: state(cl, name).at[data.t].set(jnp.asarray(row))})

    return Transform(name, init=init, end_task=end_task, task_bytes=lambda cl, t: int(state(cl, name).shape[1]),
                     scenarios=("til",))
