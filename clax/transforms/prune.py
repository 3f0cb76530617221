"""PackNet's pieces (Mallya & Lazebnik, CVPR 2018): weights owned by tasks, pruned by magnitude.

* :func:`owned`: the mask of the masked network (:mod:`clax.transforms.consolidation`): task ``t`` uses
  ``W * [1 <= owner <= t + 1]``, its own weights and all earlier tasks', in training and test alike.
* :func:`packnet`: the transform that keeps the owners (``cl.extra[name]["owner"]``, int32 of the
  weights' shapes: 0 = free, ``k + 1`` = task ``k``), gives every free weight to the task at its start,
  prunes the task's smallest weights after ``prune_after`` epochs (or at the task's end) and lets only
  the task's own weights move.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clax.compose import Transform, state, with_state
from clax.transforms import consolidation


def task_mask(cl, t, name: str = "prune"):
    """Bool tree: the weights that task ``t``'s network uses (owners ``1..t+1`` in the :func:`packnet`
    transform ``name``)."""
    return jax.tree.map(lambda o: (o >= 1) & (o <= t + 1), state(cl, name)["owner"])


def owned(name: str = "prune") -> consolidation.Mask:
    """PackNet's mask (:class:`~clax.transforms.consolidation.Mask`): ``W * task_mask(t)``, the owners
    read from the :func:`packnet` transform ``name``; no parameters of its own (the init key builds the
    network as is)."""
    def weights(cl, t):
        return consolidation.apply_masks(cl.shared["weights"], task_mask(cl, t, name))

    return consolidation.Mask("owned", lambda key, net: net(key), lambda cl, t, key: (weights(cl, t), {}),
                              weights, lambda cl, t: task_mask(cl, t, name))


def release(owner: np.ndarray, w: np.ndarray, t: int, prune: float) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, w)`` with the ``prune`` fraction of task ``t``'s own weights (``owner == t + 1``) of
    smallest ``|w|`` released: owner 0, value 0 (ties by position, a stable sort)."""
    mine = owner == t + 1
    k = int(round(prune * int(mine.sum())))
    if k:
        order = np.argsort(np.where(mine, np.abs(w), np.inf), axis=None, kind="stable")[:k]
        free = np.zeros(owner.size, bool)
        free[order] = True
        free = free.reshape(owner.shape)
        owner = np.where(free, 0, owner)
        w = np.where(free, 0, w).astype(w.dtype)
    return owner, w


def packnet(prune: float, prune_after: int, num_tasks: int, name: str = "prune") -> Transform:
    """Prune and retrain: at the start of task ``t`` every free weight is given to ``t``; after
    ``prune_after`` epochs (or at the end of the task, whichever comes first) the ``prune`` fraction of
    task ``t``'s own weights with the smallest magnitude is released (:func:`release`) and the remaining
    epochs retrain the survivors. ``update_mask``: only weights owned by the current task move. State
    ``{"owner", "pruned" [T] bool}``."""
    def init(key, cl):
        owner = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.int32), cl.shared["weights"])
        return {"owner": owner, "pruned": jnp.zeros((num_tasks,), bool)}

    def update_mask(cl, t):
        return consolidation.update_mask(cl, t, jax.tree.map(lambda o: o == t + 1, state(cl, name)["owner"]))

    def begin_task(cl, data):
        st = state(cl, name)
        return with_state(cl, name, {**st, "owner": jax.tree.map(lambda o: jnp.where(o == 0, data.t + 1, o),
                                                                  st["owner"])})

    def do_prune(cl, t):
        st = state(cl, name)
        o_leaves, treedef = jax.tree.flatten(st["owner"])
        pairs = [release(np.asarray(o), np.asarray(w), t, prune)
                 for o, w in zip(o_leaves, jax.tree.leaves(cl.shared["weights"]))]
        owner = jax.tree.unflatten(treedef, [jnp.asarray(o) for o, _ in pairs])
        weights = jax.tree.unflatten(treedef, [jnp.asarray(w) for _, w in pairs])
        cl = cl.replace(shared={**cl.shared, "weights": weights})
        return with_state(cl, name, {"owner": owner, "pruned": st["pruned"].at[t].set(True)})

    def end_epoch(cl, data, epoch):
        if epoch + 1 == int(prune_after) and not bool(state(cl, name)["pruned"][data.t]):
            return do_prune(cl, data.t)
        return cl

    def end_task(cl, data):
        return cl if bool(state(cl, name)["pruned"][data.t]) else do_prune(cl, data.t)

    return Transform(name, init=init, begin_task=begin_task, end_epoch=end_epoch, end_task=end_task,
                     update_mask=update_mask, scenarios=("til",))
