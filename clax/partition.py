"""Named partitions of a parameter tree.

A continual-learning state keeps its parameters in named partitions — ``frozen`` (never trained),
``shared`` (trained on every task), ``per_task`` (leaves with a leading task axis; row ``t`` is trained
during task ``t`` only), ``state`` (non-differentiable model state such as BatchNorm statistics) and
``extra`` (method buffers: snapshots, Fisher information, masks, replay memory).

:func:`split` assigns the leaves of a nested-dict tree to partitions by rules over their
``/``-joined paths and refuses a tree where a leaf matches no rule or more than one, in the manner of
big_vision's freezing rules.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

PyTree = Any
PARTITIONS = ("frozen", "shared", "per_task", "state", "extra")


@flax.struct.dataclass
class CLState:
    """The whole state of a continual-learning method: one pytree in five named partitions."""

    frozen: PyTree
    shared: PyTree
    per_task: PyTree
    state: PyTree
    extra: PyTree


def paths(tree: PyTree) -> list[str]:
    """The ``/``-joined key paths of a nested-dict tree's leaves."""
    return ["/".join(map(str, k)) for k in flatten_dict(tree)] if tree else []


def tree_paths(tree: PyTree) -> list[str]:
    """The ``/``-joined path of every leaf of any pytree in leaf order (``shared/backbone/Dense_0/kernel``,
    ``cl/per_task/head/kernel``, ``opt_state/0/mu/...``): the names that ``train.lr_scales`` and
    ``mesh.shard`` patterns match."""
    def name(k):
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _matcher(rule: str | Callable[[str], bool]) -> Callable[[str], bool]:
    if callable(rule):
        return rule
    pattern = re.compile(rule)
    return lambda p: pattern.search(p) is not None


def split(tree: PyTree, rules: Mapping[str, str | Callable[[str], bool]]) -> dict[str, PyTree]:
    """Splits a nested dict into ``{name: subtree}`` by ``rules`` (name -> regex or predicate on path).

    Raises:
      ValueError: a leaf matches no rule or several (the message names the path and the rules).
    """
    flat = flatten_dict(tree)
    match = {n: _matcher(r) for n, r in rules.items()}
    out: dict[str, dict] = {n: {} for n in rules}
    for key, leaf in flat.items():
        path = "/".join(map(str, key))
        hits = [n for n, m in match.items() if m(path)]
        if len(hits) != 1:
            what = "no rule" if not hits else f"several rules ({', '.join(hits)})"
            raise ValueError(f"parameter {path!r} matches {what}; every leaf must be in exactly one "
                             f"partition (rules: {dict(rules)})")
        out[hits[0]][key] = leaf
    return {n: unflatten_dict(v) if v else {} for n, v in out.items()}


def merge(*trees: PyTree) -> PyTree:
    """Inverse of :func:`split`: the union of nested dicts with disjoint leaf paths."""
    flat: dict = {}
    for t in trees:
        for k, v in (flatten_dict(t) if t else {}).items():
            if k in flat:
                raise ValueError(f"parameter {'/'.join(map(str, k))!r} is in two partitions")
            flat[k] = v
    return unflatten_dict(flat) if flat else {}


def stack_tasks(tree: PyTree, num_tasks: int) -> PyTree:
    """Repeats every leaf along a new leading task axis of size ``num_tasks``."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_tasks,) + a.shape).copy(), tree)


def task_row(tree: PyTree, t) -> PyTree:
    """Row ``t`` (a Python or traced int) of every per-task leaf."""
    return jax.tree.map(lambda a: a[t], tree)


def set_task_row(tree: PyTree, t, row: PyTree) -> PyTree:
    """``tree`` with row ``t`` of every per-task leaf replaced by ``row``; other rows untouched."""
    return jax.tree.map(lambda a, r: a.at[t].set(r), tree, row)


def count(tree: PyTree) -> int:
    """Number of scalar entries in a tree."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def nbytes(tree: PyTree) -> int:
    """Bytes held by a tree's arrays."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def check(cl: CLState, num_tasks: int) -> None:
    """Checks the partition invariants: every leaf is an array (so a checkpoint can hold it) and every
    per-task leaf carries the leading task axis.

    Raises:
      ValueError: naming the offending leaf.
    """
    for name in PARTITIONS:
        for kp, leaf in jax.tree_util.tree_flatten_with_path(getattr(cl, name))[0]:
            path = f"{name}{jax.tree_util.keystr(kp)}"
            if not hasattr(leaf, "shape"):
                raise ValueError(f"leaf {path} is a {type(leaf).__name__}, not an array")
            if name == "per_task" and (leaf.ndim == 0 or leaf.shape[0] != num_tasks):
                raise ValueError(f"per-task leaf {path} has shape {leaf.shape}; its leading axis must be "
                                 f"the {num_tasks} tasks")
