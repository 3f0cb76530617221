"""Parameter isolation: a backbone whose chosen weights are masked per task, and the consolidation of
the union of task masks. WSN, PackNet and IBM share this piece: each is
``chain(model(ctx, mask, ...), <its mask's transform>, freeze(mask, T), batchnorm.refresh(...))``.

* :class:`Mask`: how task ``t``'s weights ``W_eff`` are formed from the shared ``W`` (a model
  parameterisation: WSN's top-c scores, :func:`clax.transforms.binary_mask.top_c`; PackNet's owners,
  :func:`clax.transforms.prune.owned`; IBM's variational masks,
  :func:`clax.transforms.variational_mask.ib_mask`).
* :func:`model`: the masked network as a :class:`clax.compose.Model` (TIL only): the training forward
  uses the mask's training weights, predictions its test weights.
* :func:`freeze`: the consolidation transform: the union of finished tasks' masks gets no update, and
  each task's mask joins it at the task's end; it reports every task's mask density and the capacity
  used.

Layout of the :class:`~clax.partition.CLState` that :func:`init` builds:

* ``shared["weights"]``: the masked weights ``W`` (by default every conv/dense ``kernel``), one copy
  for all tasks. A task's forward uses ``W_eff = W * m_t`` (a pure pytree transform applied before
  the backbone's ``apply``).
* ``per_task["rest"]``: every other backbone parameter (biases, BatchNorm scale and offset), one row
  per task, and ``per_task["head"]``: one linear head per task (TIL).
* ``state["backbone"]``: BatchNorm statistics with a leading task axis; task ``t`` reads and writes
  row ``t`` only, so an old task's statistics never move (exact zero forgetting with BatchNorm).
  The network a task is tested with is not the one it trained with (IBM trains with noisy, unpruned
  weights; PackNet prunes), so the setting ``bn`` (:data:`BN_MODES`) decides which statistics the test
  uses: ``"refresh"`` (clax's default) re-estimates row ``t`` at the end of task ``t`` with the task's
  test-time weights (:func:`refresh_task`, the transform :func:`clax.transforms.batchnorm.refresh`);
  ``"batch"`` normalises with each test batch's own statistics, as the authors' code of WSN and IBM does
  (``BatchNorm2d(track_running_stats=False)``; the padded last evaluation batch then counts its padding);
  ``"running"`` keeps the running averages collected in training.
* ``extra["consolidation"]`` (the state of :func:`freeze`): bool tree over ``W``, the union of the
  masks of finished tasks. Through the transform's ``update_mask`` the trainer zeroes the gradient and
  the optimizer's update (Adam moments and weight decay included, since the update is zeroed after the
  optimizer) at those positions.

An old task's prediction reads only its own per-task rows, its own BatchNorm row and ``W`` inside its
mask, which is consolidated, hence its logits are bit-for-bit unchanged by later tasks.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from clax import partition as P
from clax.compose import Model, Transform, state
from clax.partition import CLState
from clax.transforms import classifier

if TYPE_CHECKING:
    from clax.methods.base import Context

PyTree = Any
DEFAULT_LAYERS = r"kernel$"
BN_MODES = ("refresh", "batch", "running")


class Mask(NamedTuple):
    """How a masked network forms task ``t``'s weights from the shared ``W`` (a model parameterisation).

    Attributes:
      name: the mask's name.
      init: ``(key, net) -> CLState``: ``net(key)`` builds the masked network (:func:`init`); the mask
        splits the key as it needs and adds its parameters (``shared``/``per_task``).
      train: ``(cl, t, key) -> (W_eff, aux)``: the weights task ``t`` (traced) trains with, and what
        transforms may read of them (``aux``: 0-d leaves or trees of per-layer scalars).
      test: ``(cl, t) -> W_eff``: task ``t``'s weights at test time (and for its BatchNorm refresh);
        also called during task ``t``'s epochs (validation, ``eval.every_epoch``), before its
        ``end_task``, so it must not read anything only ``end_task`` sets (WSN's stored mask:
        :func:`clax.transforms.binary_mask.live_or_stored`).
      task: ``(cl, t) -> bool tree``: task ``t``'s mask over ``W``: what consolidates at the end of the
        task and what the capacity report counts.
    """

    name: str
    init: Callable
    train: Callable
    test: Callable
    task: Callable


def check_bn(name: str, mode: str) -> str:
    """Validates a ``bn`` setting (one of :data:`BN_MODES`), naming the setting ``name``."""
    if mode not in BN_MODES:
        raise ValueError(f"{name} must be one of {', '.join(BN_MODES)}, got {mode!r}")
    return mode


def split_weights(params: PyTree, layers: str, setting: str = "layers") -> tuple[PyTree, PyTree]:
    """Splits backbone ``params`` into ``(masked, rest)`` by the regex ``layers`` over ``/``-joined paths;
    only leaves with ``ndim >= 2`` (conv and dense kernels) can be masked.

    Raises:
      ValueError: ``layers`` is not a valid regex or matches no weight (the message names the
        setting as ``setting``, e.g. ``wsn.layers``).
    """
    try:
        pattern = re.compile(layers)
    except re.error as e:
        raise ValueError(f"{setting}={layers!r} is not a valid regular expression: {e}") from None
    flat = flatten_dict(params)
    masked, rest = {}, {}
    for k, v in flat.items():
        (masked if pattern.search("/".join(k)) and v.ndim >= 2 else rest)[k] = v
    if not masked:
        raise ValueError(f"{setting}={layers!r} matches no weight of the backbone (ndim >= 2); its parameters "
                         f"are: {', '.join('/'.join(k) for k in flat)}")
    return unflatten_dict(masked), (unflatten_dict(rest) if rest else {})


def init(key, ctx: Context, layers: str = DEFAULT_LAYERS, setting: str = "layers") -> CLState:
    """A :class:`CLState` in the layout of the module docstring (``extra`` empty: the union is the state
    of :func:`freeze`).

    Raises:
      ValueError: the scenario is not TIL, or ``layers`` matches no weight (:func:`split_weights`).
    """
    if ctx.scenario != "til":
        raise ValueError(f"parameter-isolation methods need the task id: scenario must be 'til', "
                         f"got {ctx.scenario!r}")
    cl = classifier.init(key, ctx)
    weights, rest = split_weights(cl.shared["backbone"], layers, setting)
    T = ctx.num_tasks
    return CLState(
        frozen={},
        shared={"weights": weights},
        per_task={"head": cl.per_task["head"], "rest": P.stack_tasks(rest, T)},
        state={"backbone": P.stack_tasks(cl.state["backbone"], T)},
        extra={},
    )


def apply_masks(weights: PyTree, masks: PyTree) -> PyTree:
    """``W * m`` leaf by leaf (``masks`` has ``weights``' structure; float or bool)."""
    return jax.tree.map(lambda w, m: w * m.astype(w.dtype), weights, masks)


def features(cl: CLState, ctx: Context, w_eff: PyTree, x, t, train: bool, bn: str = "refresh"):
    """Backbone features ``[B, D]`` and the new ``cl.state`` of the backbone with masked weights ``w_eff``
    (see :func:`forward`)."""
    rest = P.task_row(cl.per_task["rest"], t)
    params = P.merge(w_eff, rest)
    stats = P.task_row(cl.state["backbone"], t)
    f, new_stats = ctx.backbone.apply(params, stats, x, train or bn == "batch")
    new = {**cl.state, "backbone": P.set_task_row(cl.state["backbone"], t, new_stats)} if train else cl.state
    return f, new


def head(cl: CLState, ctx: Context, f, tid) -> jax.Array:
    """Each sample's task head on features ``f``; outputs beyond its task's classes masked to -1e9."""
    out = classifier.head_logits(cl.per_task["head"], f, tid)
    return jnp.where(ctx.output_mask()[tid], out, classifier.NEG)


def forward(cl: CLState, ctx: Context, w_eff: PyTree, x, t, tid, train: bool, bn: str = "refresh"):
    """Logits ``[B, C]`` and the new ``cl.state`` of the backbone with masked weights ``w_eff``.

    ``t`` (scalar, may be traced) selects the per-task rest row and BatchNorm row; ``tid [B]`` selects
    each sample's head. Only BatchNorm row ``t`` of the returned state differs from ``cl.state``.
    With ``train=False`` and ``bn="batch"`` the batch's own statistics normalise it (the stored ones
    are neither used nor changed).
    """
    f, new = features(cl, ctx, w_eff, x, t, train, bn)
    return head(cl, ctx, f, tid), new


def model(ctx: Context, mask: Mask, layers: str = DEFAULT_LAYERS, bn: str = "refresh",
          name: str = "masked") -> Model:
    """The masked network of :func:`init` with ``mask`` as a :class:`clax.compose.Model` (TIL only).

    ``forward`` in training uses ``mask.train``'s weights and updates BatchNorm row ``t``; otherwise, and
    in ``predict``, task ``t``'s ``mask.test`` weights with the test-time statistics ``bn``. ``aux`` holds
    ``features`` and the mask's own ``aux``; ``outputs`` gives every task's head ``[B, T, C]``. A bad
    ``layers`` regex is refused at ``init``, naming the setting ``{name}.layers``.
    """
    def init_(key):
        return mask.init(key, lambda k: init(k, ctx, layers, f"{name}.layers"))

    def forward_(cl, x, tid, t, train, key):
        w_eff, aux = mask.train(cl, t, key) if train else (mask.test(cl, t), {})
        f, new = features(cl, ctx, w_eff, x, t, train, bn)
        return head(cl, ctx, f, tid), {**aux, "features": f}, new

    def predict(cl, x, tid):
        t = batch_task(tid)
        return forward(cl, ctx, mask.test(cl, t), x, t, tid, train=False, bn=bn)[0]

    def outputs(cl, aux):
        h = cl.per_task["head"]
        return jnp.einsum("bd,tdc->btc", aux["features"], h["kernel"]) + h["bias"][None]

    return Model(name, init_, forward_, predict, outputs, scenarios=("til",), mixed_tasks=False)


def refresh_task(cl: CLState, ctx: Context, refresh, w_eff: PyTree, t: int, x, batch_size: int) -> CLState:
    """``cl`` with task ``t``'s BatchNorm row re-estimated for the network ``w_eff`` (the task's test-time
    masked weights) on the task's training inputs ``x``; ``refresh`` is a
    :func:`clax.transforms.batchnorm.make_refresh` of the backbone. No other row changes."""
    if not jax.tree.leaves(cl.state["backbone"]):
        return cl
    params = P.merge(w_eff, P.task_row(cl.per_task["rest"], t))
    new = refresh(params, P.task_row(cl.state["backbone"], t), x, batch_size)
    return cl.replace(state={**cl.state, "backbone": P.set_task_row(cl.state["backbone"], t, new)})


def batch_task(tid) -> jax.Array:
    """The task whose sub-network serves a batch: ``tid[0]``. A masked network runs one sub-network per
    batch, so every sample of a batch must carry the same task id (the trainer evaluates task by task)."""
    return tid[0]


def update_mask(cl: CLState, t, weights: PyTree) -> dict:
    """An update mask over the trained tree: ``shared["weights"]`` move where ``weights`` (bool tree) is
    True, every other shared parameter (WSN's scores) and task ``t``'s per-task row move freely."""
    ones = lambda tree: jax.tree.map(lambda a: jnp.ones(a.shape, bool), tree)  # noqa: E731
    shared = {k: (weights if k == "weights" else ones(v)) for k, v in cl.shared.items()}
    return {"shared": shared, "task": ones(P.task_row(cl.per_task, t))}


def union(cl: CLState, name: str = "consolidation") -> PyTree:
    """The consolidated union (bool tree over ``W``) kept by the :func:`freeze` transform ``name``."""
    return state(cl, name)


def freeze(mask: Mask, num_tasks: int, name: str = "consolidation") -> Transform:
    """Consolidation: the union of finished tasks' masks (``cl.extra[name]``, bool over ``W``) gets no
    update (``update_mask``); at the end of task ``t``, ``mask.task(cl, t)`` joins it. ``report``:
    :func:`capacity_report` of every task's mask."""
    def init_(key, cl):
        return jax.tree.map(lambda w: jnp.zeros(w.shape, bool), cl.shared["weights"])

    def update_mask_(cl, t):
        return update_mask(cl, t, jax.tree.map(jnp.logical_not, state(cl, name)))

    def end_task(cl, data):
        return cl.replace(extra={**cl.extra, name: consolidate(state(cl, name), mask.task(cl, data.t))})

    def report(cl):
        return capacity_report([mask.task(cl, t) for t in range(num_tasks)])

    return Transform(name, init=init_, update_mask=update_mask_, end_task=end_task, report=report,
                     scenarios=("til",))


def consolidate(consolidated: PyTree, mask: PyTree) -> PyTree:
    """The union ``consolidated | mask`` (bool trees of the weights' structure)."""
    return jax.tree.map(lambda c, m: jnp.logical_or(c, m.astype(bool)), consolidated, mask)


def reinit_free(old: PyTree, fresh: PyTree, consolidated: PyTree) -> PyTree:
    """``old`` at consolidated positions, ``fresh`` at free ones (re-initialisation of free positions)."""
    return jax.tree.map(lambda o, f, c: jnp.where(c, o, f), old, fresh, consolidated)


def fraction(mask: PyTree) -> float:
    """Fraction of entries set in a bool/0-1 tree (over all its leaves together)."""
    leaves = [np.asarray(m) for m in jax.tree.leaves(mask)]
    return float(sum(int(np.count_nonzero(m)) for m in leaves) / sum(m.size for m in leaves))


def capacity_report(masks: Sequence[PyTree]) -> dict:
    """``{"mask_density": [...], "capacity_used": [...]}`` for the task masks ``masks[t]``: the fraction
    of the masked weights that task ``t`` uses, and the fraction consolidated after task ``t`` (the
    union of masks ``0..t``)."""
    density, used, union = [], [], None
    for m in masks:
        m = jax.tree.map(lambda a: np.asarray(a, bool), m)
        union = m if union is None else jax.tree.map(np.logical_or, union, m)
        density.append(fraction(m))
        used.append(fraction(union))
    return {"mask_density": density, "capacity_used": used}


def count_weights(cl: CLState) -> int:
    """Number of masked weights (the denominator of densities)."""
    return P.count(cl.shared["weights"])
