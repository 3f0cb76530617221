"""HNET's output regulariser on generated weights (von Oswald et al., ICLR 2020), a
:class:`clax.compose.Transform` over a hypernetwork ``cl.shared[params]`` and task embeddings
``cl.per_task[emb]``.

While task ``t`` trains it adds

    beta * 1/t * sum_{j<t} || W(e_j; theta*) - W(e_j; theta) ||^2

where ``W(e; theta)`` are the GENERATED WEIGHTS — the hypernetwork's outputs after the layout's
per-leaf affine ``shift + scale * raw`` (:class:`clax.transforms.hypernet.Layout`), i.e. the target
network's parameters — and the squared norm sums over all of the target's leaves. This is the
authors' regulariser (hypercl / viki760 ``utils/hnet_regularizer.py:calc_fix_target_reg``: the squared
distance between the flattened weight tensors that ``hnet.forward`` returns, the main network's
weights), so ``beta`` means what it means in the paper whatever scale the target's leaves have.
``W(e_j; theta*)`` are the generated weights for the earlier tasks' embeddings taken by ``begin_task``
before task ``t`` (kept flat in layout order in ``cl.extra[name]["targets"]``, ``[T, P]``). With
``lookahead`` the regulariser is evaluated at ``theta - lookahead_lr * stop_grad(dCE/dtheta)`` (the
one-step lookahead of the paper; a plain gradient step stands in for the optimizer's step), with CE
the task's cross-entropy through the chain's model. Term ``reg`` (before ``beta``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clax.compose import Transform, state, with_state
from clax.transforms import hypernet as H


def output_regulariser(hn: H.Hypernet, hparams, embs: jax.Array, targets: jax.Array, t) -> jax.Array:
    """``1/t * sum_{j<t} || W(e_j; hparams) - targets_j ||^2`` (0 at ``t = 0``).

    ``embs [T, E]`` task embeddings, ``targets [T, P]`` generated weights (flat, layout order, see
    :func:`clax.transforms.hypernet.generated_flat`); rows ``j >= t`` are ignored. The distance is in
    weight units: it sums ``||W_leaf(e_j; hparams) - W_leaf*||^2`` over the target's leaves.
    """
    out = jax.vmap(lambda e: H.generated_flat(hn, hparams, e))(embs)     # [T, P] generated weights
    sq = jnp.sum((out - targets) ** 2, axis=-1)
    return jnp.sum(jnp.where(jnp.arange(embs.shape[0]) < t, sq, 0.0)) / jnp.maximum(t, 1)


def transform(hn: H.Hypernet, num_tasks: int, beta: float, lookahead: bool = False, lookahead_lr: float = 1e-3,
              params: str = "hnet", emb: str = "emb", name: str = "output_reg", setting: str = "hnet") -> Transform:
    """The output regulariser of hypernetwork ``hn`` (``cl.shared[params]``) over the embeddings
    ``cl.per_task[emb]`` of ``num_tasks`` tasks (see the module docstring).

    Raises:
      ValueError: ``beta < 0``, naming the setting ``{setting}.beta``.
    """
    if beta < 0:
        raise ValueError(f"{setting}.beta must be >= 0, got {beta}")

    @jax.jit
    def all_weights(hparams, embs):
        return jax.vmap(lambda e: H.generated_flat(hn, hparams, e))(embs)

    def init(key, cl):
        return {"targets": jnp.zeros((num_tasks, hn.layout.num_params))}

    def begin_task(cl, data):
        # theta* snapshot: the generated weights for every embedding before task t trains.
        return with_state(cl, name, {"targets": all_weights(cl.shared[params], cl.per_task[emb])})

    def loss(cl, view, batch, key, t):
        hparams = cl.shared[params]
        if lookahead:
            def task_ce(hp):
                model = view.model
                logits, _, _ = model.forward(cl.replace(shared={**cl.shared, params: hp}), batch["x"],
                                             batch["tid"], t, True, key)
                y = batch["y"] if model.targets is None else model.targets(batch["y"], batch["tid"], t)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            g = jax.grad(task_ce)(hparams)
            hparams = jax.tree.map(lambda p, gi: p - lookahead_lr * jax.lax.stop_gradient(gi), hparams, g)
        reg = output_regulariser(hn, hparams, cl.per_task[emb], state(cl, name)["targets"], t)
        return beta * reg, {"reg": reg}

    return Transform(name, init=init, begin_task=begin_task, loss=loss)
