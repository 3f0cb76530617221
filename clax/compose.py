"""Methods as chains: a :class:`Model` that owns the forward pass and the output space, and
:class:`Transform` s that each add one continual-learning mechanism, composed by :func:`chain` into the
:class:`~clax.methods.base.Method` the one trainer runs.

As in optax, a transform is a NamedTuple of pure functions (every one optional) and knows nothing of
the others; its state lives under its own name, ``cl.extra[name]``, so any two compose without
collisions. Who owns what:

* The model owns the network and the scenario's output space: ``forward`` gives logits over the
  space a sample's target lives in (its task's head, outputs beyond the task's classes masked, in
  TIL; every class in CIL) and ``outputs`` gives every task's outputs (``[B, T, K]`` in TIL,
  ``[B, K]`` in CIL) for distillation. Exactly one model per method.
* The chain owns the classification loss: ``ce``, the mean cross-entropy of the *current task's*
  samples, over the model's output space, restricted where a transform says so (``ce_mask``: LwF in
  CIL keeps the current task's classes). Samples a transform mixes into the batch (``batch`` hook:
  rehearsal) are not in ``ce``: the transform that added them scores them itself, over the full
  output space, as its own named term. A ``ce_mask`` stands in for the old classes' absence from the
  batch (LwF alone in CIL), so it applies only where no transform mixes rows in: with rehearsal the
  old classes are in the batch and the current task's softmax spans the whole output space, as the
  rehearsal rows' does. So distillation and rehearsal compose, in TIL and CIL alike.

Per training step (inside the compiled step), :func:`chain`'s loss runs::

    rows = [batch] + [tr.batch(cl, batch, key, t) for tr with a batch hook]   # concatenated
    logits, aux, state = model.forward(cl, rows.x, rows.tid, t, train=True, key)
    total = ce(new rows)  +  sum over transforms of tr.loss(cl, view, batch, key, t)

Keys: the model's forward gets the step's key; transform ``i`` gets keys folded from
``fold_in(key, i + 1)`` (one for ``batch``, another for ``loss``), so no two parts share a draw.
After the optimizer's update, ``tr.on_update(cl, grads, updates, t)`` (SI's path integral) and
``tr.post_update(cl, batch, key, t)`` (a second optimiser, e.g. PAH's prototype step).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any
NEG = -1e9
#: the fields every batch row has; a ``batch`` hook's rows may carry more (kept apart, see :class:`View`)
ROW_FIELDS = ("x", "y", "tid")


class Model(NamedTuple):
    """The network of a method and its output space.

    Attributes:
      name: the model's name (``classifier``, or the method whose network it is).
      init: ``key -> CLState`` with the model's partitions (``extra`` may hold model buffers).
      forward: ``(cl, x, tid, t, train, key) -> (logits [B, K], aux dict, new cl.state)``: ``tid [B]``
        each sample's task, ``t`` the task being trained (traced int32); ``aux`` holds what transforms may
        read (the classifier's ``features``).
      predict: ``(cl, x, tid or None) -> logits`` at test time (``tid [B]`` in TIL, None in CIL).
      outputs: optional ``(cl, aux) -> every task's outputs``: ``[B, T, K]`` in TIL, ``[B, K]`` in CIL,
        from the ``aux`` of a forward pass (distillation reads old tasks' outputs here).
      targets: optional ``(y, tid, t) -> y`` mapping a batch's targets into ``forward``'s output space
        where it differs from the scenario's (HNET's CIL trains each task's generated head on local ids).
      scenarios: the scenarios the model supports.
      default: True for the plain classifier every baseline starts from; a method with a model of its
        own (a masked, generated or frozen network) replaces it when methods are joined with ``+``.
      mixed_tasks: whether ``forward`` scores each row under its own task id (the classifier's per-row
        heads, the frozen-backbone models' per-row task dispatch). False where one task's network runs
        for the whole batch (masked sub-networks, hypernetwork-generated networks): a transform that
        mixes in rows of other tasks (``Transform.mixes_tasks``, rehearsal) is then refused.
      ce: optional ``(logits, y, tid, t) -> [N]``: the per-sample classification loss of the current
        task's rows, in place of softmax cross-entropy (Soft-TF's label smoothing over a task's classes).
      scalar_tid: ``forward`` also takes a scalar ``tid``, meaning every row is task ``t``'s; :func:`chain`
        passes ``t`` itself where that is known when the step is traced (no transform adds rows and
        training is not cumulative), so the compiled step holds no per-row task dispatch. The
        frozen-backbone models (CLR, Soft-TF) set it: their dispatch is two more backbone passes
        (:func:`clax.transforms.frozen.train_rows`), which only a batch with rehearsal rows runs but every
        step would otherwise trace and compile. Such a model's ``predict`` (and the transforms' wrappers of
        it) also gets a scalar ``tid`` from the trainer's TIL eval step, whose batch is one task's.
    """

    name: str
    init: Callable
    forward: Callable
    predict: Callable
    outputs: Optional[Callable] = None
    targets: Optional[Callable] = None
    scenarios: tuple = ("til", "cil")
    default: bool = False
    ce: Optional[Callable] = None
    mixed_tasks: bool = True
    scalar_tid: bool = False


class View(NamedTuple):
    """What a transform's ``loss`` hook sees of the step's forward pass.

    Attributes:
      logits: ``[N, K]`` the model's training logits for every row (the task's batch first, then each
        transform's mixed-in rows).
      aux: the model's ``aux`` for every row.
      new: the number of rows of the current task's batch (rows ``[0, new)``).
      rows: ``{transform name: (start, stop)}`` of the rows each ``batch`` hook added.
      data: the concatenated rows (``x``, ``y``, ``tid`` and whatever fields the hooks added).
      model: the :class:`Model` (to run a teacher or read ``outputs``).
      added: ``{transform name: fields}``: the fields of a hook's rows beyond ``x``, ``y``, ``tid``
        (e.g. DER++'s stored ``logits``).
    """

    logits: jax.Array
    aux: dict
    new: int
    rows: dict
    data: dict
    model: Model
    added: dict = {}

    def part(self, name: str) -> tuple[jax.Array, dict, dict]:
        """``(logits, aux, data)`` of the rows transform ``name`` added (or ``"new"``: the task's batch)."""
        a, b = (0, self.new) if name == "new" else self.rows[name]
        take = lambda v: v[a:b] if hasattr(v, "shape") and v.ndim and v.shape[0] == self.logits.shape[0] else v
        data = {k: self.data[k][a:b] for k in ROW_FIELDS}
        return self.logits[a:b], jax.tree.map(take, self.aux), {**data, **self.added.get(name, {})}


class Transform(NamedTuple):
    """One continual-learning mechanism; every hook is optional.

    Attributes:
      name: the transform's name; its state is ``cl.extra[name]``.
      init: ``(key, cl) -> state`` (stored at ``cl.extra[name]``).
      begin_task, end_task: host-side ``(cl, TaskData) -> cl`` (snapshots, Fisher, buffers).
      end_epoch: host-side ``(cl, TaskData, epoch) -> cl``.
      batch: ``(cl, batch, key, t) -> rows`` to add to the batch (``x``, ``y``, ``tid`` and any fields
        of the transform's own, e.g. stored logits); the transform scores them in ``loss``.
      loss: ``(cl, view, batch, key, t) -> (added to the loss, {term name: value})``.
      ce_mask: ``(tid, t) -> bool [B, K]``: outputs the current task's cross-entropy keeps.
      predict: ``predict -> predict``: wraps the model's ``(cl, x, tid) -> logits``.
      update_mask: ``(cl, t) -> bool tree`` over the trained tree; False positions get no update.
      on_update: ``(cl, grads, updates, t) -> cl`` inside the compiled step, after the optimizer's
        update: sees the gradient and the update of the trained tree (``{"shared", "task"}``).
      post_update: ``(cl, batch, key, t) -> cl`` inside the compiled step, after ``on_update``.
      train_filter, task_bytes, report, test_report, lr_scales: as the fields of
        :class:`~clax.methods.base.Method` of those names.
      cumulative: train task ``r`` on tasks ``0..r`` (joint training).
      scenarios: the scenarios the transform supports.
      owns: resources only one transform of a method may hold (e.g. ``("task_inference",)``).
      mixes_tasks: its ``batch`` hook adds rows of other tasks (rehearsal): the model must score each
        row under its own task (:attr:`Model.mixed_tasks`).
      step: optional ``(cl, view, batch, key, t) -> state``: the transform's new state from the step's
        forward pass, at the parameters before the optimizer's update (a second optimiser stepped on the
        same forward as the main one: the H-embedding decoder's Adam); stored at ``cl.extra[name]`` once
        the update is applied (carried out of the loss under ``cl.state[STEPPED]``, popped by ``on_update``).
    """

    name: str
    init: Optional[Callable] = None
    begin_task: Optional[Callable] = None
    end_task: Optional[Callable] = None
    end_epoch: Optional[Callable] = None
    batch: Optional[Callable] = None
    loss: Optional[Callable] = None
    ce_mask: Optional[Callable] = None
    predict: Optional[Callable] = None
    update_mask: Optional[Callable] = None
    on_update: Optional[Callable] = None
    post_update: Optional[Callable] = None
    train_filter: Optional[Callable] = None
    task_bytes: Optional[Callable] = None
    report: Optional[Callable] = None
    test_report: Optional[Callable] = None
    lr_scales: tuple = ()
    cumulative: bool = False
    scenarios: tuple = ("til", "cil")
    owns: tuple = ()
    mixes_tasks: bool = False
    step: Optional[Callable] = None


#: where :func:`chain`'s loss carries the ``step`` hooks' new states to the update (popped there)
STEPPED = "stepped"


def state(cl, name: str):
    """Transform ``name``'s state, ``cl.extra[name]``."""
    return cl.extra[name]


def with_state(cl, name: str, value):
    """``cl`` with transform ``name``'s state replaced by ``value``."""
    return cl.replace(extra={**cl.extra, name: value})


def check_chain(model: Model, transforms: Sequence[Transform], scenario: Optional[str] = None) -> None:
    """Refuses a chain that cannot work: two transforms of one name or owning the same resource, or a
    part that does not support ``scenario``; the message names both parts.

    Raises:
      ValueError: naming the parts and why.
    """
    seen: dict[str, str] = {}
    for tr in transforms:
        if tr.name in seen:
            raise ValueError(f"two parts of the method are named {tr.name!r}: each transform keeps its state "
                             "under its name, so a method can hold it once")
        for r in tr.owns:
            other = seen.get(f"owns:{r}")
            if other:
                raise ValueError(f"{other} and {tr.name} both own the {r.replace('_', ' ')}; a method can have "
                                 "one of them")
            seen[f"owns:{r}"] = tr.name
        seen[tr.name] = tr.name
    for tr in transforms:
        if tr.mixes_tasks and not model.mixed_tasks:
            raise ValueError(f"{tr.name} mixes stored samples of other tasks into each batch, but {model.name} "
                             "runs one task's network for the whole batch; the two cannot be joined")
    if scenario is not None:
        for part, scen in [(model.name, model.scenarios)] + [(tr.name, tr.scenarios) for tr in transforms]:
            if scenario not in scen:
                raise ValueError(f"{part} supports {'/'.join(scen)} only, not scenario {scenario!r}")


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def chain(model: Model, *transforms: Transform, name: Optional[str] = None, scenario: Optional[str] = None,
          evaluates_unseen: bool = True):
    """A :class:`~clax.methods.base.Method` from ``model`` and ``transforms`` (applied in order).

    Args:
      model: the network and its output space.
      transforms: the mechanisms, each with its state under its own name.
      name: the method's name (default: the transforms' names joined with ``+``, or the model's).
      scenario: checked against every part's ``scenarios`` when given.
      evaluates_unseen: whether a task can be evaluated before it is trained (for FWT).

    Raises:
      ValueError: an impossible combination (:func:`check_chain`).
    """
    from clax.methods.base import Method, TaskData

    transforms = tuple(transforms)
    check_chain(model, transforms, scenario)
    name = name or "+".join(tr.name for tr in transforms) or model.name
    cumulative = any(tr.cumulative for tr in transforms)

    def init_transforms(key, cl):
        for i, tr in enumerate(transforms):
            if tr.init is not None:
                cl = with_state(cl, tr.name, tr.init(jax.random.fold_in(key, i + 1), cl))
        return cl

    def init_model(key):
        return model.init(key)

    def init(key):
        return init_transforms(key, init_model(key))

    # clax.models.jit_init compiles the two apart: the model's init is then one program for every method
    # on that model (the main job's 14 classifier runs share two), read back from JAX's persistent cache
    init.stages = (init_model, init_transforms)

    def loss(cl, batch, key, t):
        keys = [jax.random.fold_in(key, i + 1) for i in range(len(transforms))]
        data, rows, added, n = dict(batch), {}, {}, batch["x"].shape[0]
        for i, tr in enumerate(transforms):
            if tr.batch is not None:
                add = tr.batch(cl, batch, jax.random.fold_in(keys[i], 0), t)
                start = data["x"].shape[0]
                data = {k: jnp.concatenate([data[k], add[k]]) if k in ROW_FIELDS else v for k, v in data.items()}
                rows[tr.name] = (start, data["x"].shape[0])
                added[tr.name] = {k: v for k, v in add.items() if k not in ROW_FIELDS}
        one_task = model.scalar_tid and not rows and not cumulative  # every row is task t's (see Model)
        logits, aux, new_state = model.forward(cl, data["x"], t if one_task else data["tid"], t, True, key)
        y = data["y"] if model.targets is None else model.targets(data["y"], data["tid"], t)
        data["y"] = y
        new = logits[:n] if rows else logits
        for tr in transforms:
            if tr.ce_mask is not None and not rows:  # with rehearsal rows the old classes are in the batch
                new = jnp.where(tr.ce_mask(batch["tid"], t), new, NEG)
        y_new = y[:n] if rows else y
        ce = (_ce(new, y_new) if model.ce is None else model.ce(new, y_new, batch["tid"], t)).mean()
        total, metrics = ce, {"ce": ce}
        view = View(logits, aux, n, rows, data, model, added)
        for i, tr in enumerate(transforms):
            if tr.loss is not None:
                add, m = tr.loss(cl, view, batch, jax.random.fold_in(keys[i], 1), t)
                total = total + add
                metrics.update(m)
        stepped = {tr.name: tr.step(cl, view, batch, jax.random.fold_in(keys[i], 2), t)
                   for i, tr in enumerate(transforms) if tr.step is not None}
        new_state = {**new_state, STEPPED: stepped} if stepped else new_state
        return total, (new_state, {"loss": total, **metrics})

    predict = model.predict
    for tr in transforms:
        if tr.predict is not None:
            predict = tr.predict(predict)

    def hooks(attr):
        fns = [getattr(tr, attr) for tr in transforms if getattr(tr, attr) is not None]
        if not fns:
            return None

        def run(cl, *args):
            if args and isinstance(args[0], TaskData):
                args = (args[0]._replace(model=model),) + args[1:]
            for f in fns:
                cl = f(cl, *args)
            return cl
        return run

    masks = [tr.update_mask for tr in transforms if tr.update_mask is not None]

    def update_mask(cl, t):
        out = None
        for f in masks:
            m = f(cl, t)
            out = m if out is None else jax.tree.map(jnp.logical_and, out, m)
        return out

    def task_bytes(cl, t):
        return sum(tr.task_bytes(cl, t) for tr in transforms if tr.task_bytes is not None)

    def report(cl):
        return {k: v for tr in transforms if tr.report is not None for k, v in tr.report(cl).items()}

    def test_report(cl, bench, accuracy):
        return {k: v for tr in transforms if tr.test_report is not None
                for k, v in tr.test_report(cl, bench, accuracy).items()}

    filters = [tr.train_filter for tr in transforms if tr.train_filter is not None]
    if len(filters) > 1:
        raise ValueError("two transforms filter the training samples: " + ", ".join(
            tr.name for tr in transforms if tr.train_filter is not None))
    identity = lambda cl, *a: cl  # noqa: E731
    return Method(
        name, init, loss, predict,
        begin_task=hooks("begin_task") or identity, end_task=hooks("end_task") or identity,
        update_mask=update_mask if masks else None, post_update=hooks("post_update"),
        on_update=_with_stepped(hooks("on_update")) if any(tr.step for tr in transforms) else hooks("on_update"),
        end_epoch=hooks("end_epoch"),
        cumulative=cumulative, evaluates_unseen=evaluates_unseen,
        task_bytes=task_bytes if any(tr.task_bytes for tr in transforms) else None,
        report=report if any(tr.report for tr in transforms) else None,
        test_report=test_report if any(tr.test_report for tr in transforms) else None,
        train_filter=filters[0] if filters else None,
        lr_scales=tuple(r for tr in transforms for r in tr.lr_scales),
        model=model, transforms=transforms)


def _with_stepped(on_update):
    """``on_update`` after moving the ``step`` hooks' states from ``cl.state[STEPPED]`` to ``cl.extra``."""
    def run(cl, grads, updates, t):
        st = dict(cl.state)
        stepped = st.pop(STEPPED)
        cl = cl.replace(state=st, extra={**cl.extra, **stepped})
        return cl if on_update is None else on_update(cl, grads, updates, t)
    return run


def join(*methods, scenario: Optional[str] = None):
    """Methods built by :func:`chain` joined into one (``--method replay+lwf``): the one model that is
    not the default classifier (or the classifier), and every transform in order.

    Raises:
      ValueError: a method not built by :func:`chain`, two parts with models of their own (both own
        the network and its head), or any refusal of :func:`check_chain`; the message names the parts.
    """
    for m in methods:
        if m.model is None:
            raise ValueError(f"method {m.name!r} is not a chain (clax.chain) and cannot be joined with '+'")
    own = [m for m in methods if not m.model.default]
    if len(own) > 1:
        raise ValueError(f"{own[0].name} and {own[1].name} both own the network and its head "
                         f"({own[0].model.name} and {own[1].model.name}); a method can have one")
    model = (own or methods)[0].model
    transforms = tuple(tr for m in methods for tr in m.transforms)
    return chain(model, *transforms, name="+".join(m.name for m in methods), scenario=scenario,
                 evaluates_unseen=all(m.evaluates_unseen for m in methods))


# --- the optimizer's step, for losses that look ahead by it (hnet.lookahead_step=optimizer) ----------------

_OPTIMIZER_STEP: contextvars.ContextVar = contextvars.ContextVar("clax_optimizer_step", default=None)


@contextlib.contextmanager
def optimizer_step(fn: Callable):
    """While the trainer traces a train step: ``fn(grads) -> updates``, the update its optimizer would
    apply for a gradient ``grads`` over the trained tree (``{"shared", "task"}``, :func:`clax.train.trainable`)
    from the optimizer state before this step, without changing that state (the method's update mask
    applied to the gradient and to the update, as the step applies it). Read by :func:`current_optimizer_step`
    inside the loss (:func:`lookahead_regulariser`). A trace-time value: nothing of it is stored."""
    token = _OPTIMIZER_STEP.set(fn)
    try:
        yield
    finally:
        _OPTIMIZER_STEP.reset(token)


def current_optimizer_step() -> Callable | None:
    """The ``fn(grads) -> updates`` set by :func:`optimizer_step` around the step being traced, or None."""
    return _OPTIMIZER_STEP.get()
