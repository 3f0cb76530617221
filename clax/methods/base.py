"""The method protocol: a continual-learning method is a few pure functions over a :class:`CLState`.

Like an optax ``GradientTransformation``, a :class:`Method` is a NamedTuple of functions; fixed
settings live in the factory's closure and everything that changes lives in the state. The one
generic trainer (:mod:`clax.train`) calls them in this order, for each task ``t``::

    cl = method.begin_task(cl, task_data)          # host side: snapshots, re-initialisation
    for batch in epochs:                           # jit-compiled; t is a traced int32
        loss, (state, metrics) = method.loss(cl_with_trainable_rows, batch, key, t)
    cl = method.end_task(cl, task_data)            # host side: Fisher, consolidation, SVD, buffers
    logits = method.predict(cl, x, tid)            # tid [B] in TIL, None in CIL

Only ``cl.shared`` and row ``t`` of ``cl.per_task`` are differentiated and reach the optimizer; the
trainer writes back nothing else, so other tasks' rows stay bit-for-bit unchanged.

Methods are not written against this protocol directly: :func:`clax.compose.chain` builds a
:class:`Method` from a model and small transforms, and ``+`` joins chains (:func:`clax.compose.join`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from clax.models import Backbone
from clax.partition import CLState

PyTree = Any


class Context(NamedTuple):
    """What a method factory knows about the stream it will learn.

    Attributes:
      backbone: the feature extractor.
      num_tasks: T.
      scenario: ``"til"`` or ``"cil"``.
      num_outputs: output width (classes per task in TIL, all classes in CIL).
      task_classes: ``[T, C_max]`` global class ids of each task, padded with -1.
      input_shape: shape of one input.
    """

    backbone: Backbone
    num_tasks: int
    scenario: str
    num_outputs: int
    task_classes: np.ndarray
    input_shape: tuple[int, ...]

    def output_mask(self) -> jnp.ndarray:
        """``[T, num_outputs]`` bool: the outputs that belong to each task."""
        if self.scenario == "til":
            return jnp.asarray(self.task_classes >= 0)
        m = np.zeros((self.num_tasks, self.num_outputs), bool)
        for t, cs in enumerate(self.task_classes):
            m[t, cs[cs >= 0]] = True
        return jnp.asarray(m)


class TaskData(NamedTuple):
    """One task's training data as the host-side hooks see it (targets already mapped)."""

    t: int
    x: np.ndarray
    y: np.ndarray
    key: jax.Array
    batch_size: int
    model: Any = None  # the method's clax.compose.Model, given by clax.compose.chain to its transforms


def _identity_hook(cl: CLState, data: TaskData) -> CLState:
    return cl


class Method(NamedTuple):
    """A continual-learning method as pure functions (see the module docstring).

    Attributes:
      name: registry name.
      init: ``key -> CLState``.
      loss: ``(cl, batch, key, t) -> (scalar, (new cl.state, metrics dict))``; batch holds ``x``,
        ``y`` (targets) and ``tid`` (task id per sample).
      predict: ``(cl, x, tid or None) -> logits``; ``tid`` is ``[B]`` int in TIL and None in CIL.
      begin_task, end_task: host-side hooks ``(cl, TaskData) -> cl``.
      update_mask: optional ``(cl, t) -> bool tree`` over ``{"shared", "task"}``; where False, the
        gradient and the optimizer's update are zeroed (consolidated weights of WSN, IBM, PackNet).
      on_update: optional ``(cl, grads, updates, t) -> cl`` run inside the compiled step right after the
        optimizer's update: ``grads`` and ``updates`` are trees over the trained tree (``{"shared",
        "task"}``), after the update mask (e.g. SI's path integral ``-g * delta``, no second backward).
      post_update: optional ``(cl, batch, key, t) -> cl`` run inside the compiled step after the
        optimizer's update (and ``on_update``) (a second optimiser over part of the state, e.g. PAH's prototype step;
        its optimizer state lives in ``cl.extra``).
      end_epoch: optional host-side hook ``(cl, TaskData, epoch) -> cl`` (e.g. IBM's periodic SVD).
      cumulative: train task ``r`` on the union of tasks ``0..r`` (joint training).
      evaluates_unseen: whether a task can be evaluated before it is trained (for FWT).
      task_bytes: optional ``(cl, t) -> int``: bytes stored for task ``t`` beyond its per-task row as
        the trainer counts it (float32 arrays); negative where the method stores that row more
        compactly (soft masks in int8, binary masks bit-packed), so the reported total is what is stored.
      report: optional ``cl -> dict`` of extra per-run results (e.g. per-task ``mask_density`` and
        ``capacity_used`` of parameter-isolation methods), merged into ``results.json``.
      test_report: optional host-side ``(cl, benchmark, accuracy) -> dict`` of figures on the benchmark's
        test sets after the last task (e.g. Soft-TF's CIL task-id accuracy), merged into
        ``results.json``; ``accuracy(cl, c)`` is task ``c``'s test accuracy of a state ``cl`` (of the
        trained state's structure) by the trainer's compiled eval step, what the accuracy matrix reads.
      train_filter: optional host-side ``TaskData -> int indices`` of the task's training samples to
        train on, applied after ``begin_task`` (PAH drops the images its prototypes were initialised
        from); it must depend on the data only, so that a resumed run drops the same samples.
      lr_scales: ``((regex, scale), ...)``: the method's own per-partition learning-rate multipliers over
        the trained tree's paths (e.g. PAH's ``(("shared/backbone", 0.1),)``), applied before the
        config's ``train.lr_scales`` (see :func:`clax.train.lr_scale_transform`).
      model, transforms: the :class:`clax.compose.Model` and :class:`clax.compose.Transform` s of a method
        built by :func:`clax.compose.chain` (None and ``()`` otherwise); what ``+`` joins.
    """

    name: str
    init: Callable[[jax.Array], CLState]
    loss: Callable[..., tuple[jax.Array, tuple[PyTree, dict]]]
    predict: Callable[..., jax.Array]
    begin_task: Callable[[CLState, TaskData], CLState] = _identity_hook
    end_task: Callable[[CLState, TaskData], CLState] = _identity_hook
    update_mask: Optional[Callable[[CLState, Any], PyTree]] = None
    post_update: Optional[Callable[..., CLState]] = None
    end_epoch: Optional[Callable[[CLState, TaskData, int], CLState]] = None
    cumulative: bool = False
    evaluates_unseen: bool = True
    task_bytes: Optional[Callable[[CLState, int], int]] = None
    report: Optional[Callable[[CLState], dict]] = None
    test_report: Optional[Callable[[CLState, Any, Callable[[CLState, int], float]], dict]] = None
    train_filter: Optional[Callable[[TaskData], np.ndarray]] = None
    lr_scales: tuple = ()
    on_update: Optional[Callable[..., CLState]] = None
    model: Any = None
    transforms: tuple = ()
