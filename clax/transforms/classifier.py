"""Backbone + linear head, the model most methods start from.

In TIL the head is per task (``per_task["head"]``, ``[T, D, C]``) and a sample's task id picks its
row; in CIL one head over all classes is shared. The backbone's parameters go to ``shared`` (or
``frozen`` when ``frozen_backbone``) and its BatchNorm statistics to ``state``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from clax.partition import CLState

if TYPE_CHECKING:  # a runtime import would cycle: clax.methods imports this module
    from clax.methods.base import Context

NEG = -1e9


def init_head(key, in_dim: int, out_dim: int) -> dict:
    """A linear head ``{"kernel": [in_dim, out_dim], "bias": [out_dim]}`` (LeCun-normal, zero bias)."""
    return {"kernel": jax.nn.initializers.lecun_normal()(key, (in_dim, out_dim)),
            "bias": jnp.zeros((out_dim,))}


def head_logits(head: dict, f: jax.Array, tid=None) -> jax.Array:
    """Logits ``[B, C]`` of features ``f [B, D]``; with ``tid [B]`` the head has a task axis."""
    if tid is None:
        return f @ head["kernel"] + head["bias"]
    return jnp.einsum("bd,bdc->bc", f, head["kernel"][tid]) + head["bias"][tid]


def init(key, ctx: Context, frozen_backbone: bool = False) -> CLState:
    """A :class:`CLState` holding the backbone and a per-task (TIL) or shared (CIL) head."""
    kb, kh = jax.random.split(key)
    params, stats = ctx.backbone.init(kb)
    d, c = ctx.backbone.feature_dim, ctx.num_outputs
    shared, per_task = {}, {}
    if ctx.scenario == "til":
        per_task["head"] = jax.vmap(lambda k: init_head(k, d, c))(jax.random.split(kh, ctx.num_tasks))
    else:
        shared["head"] = init_head(kh, d, c)
    frozen = {"backbone": params} if frozen_backbone else {}
    if not frozen_backbone:
        shared["backbone"] = params
    return CLState(frozen=frozen, shared=shared, per_task=per_task, state={"backbone": stats}, extra={})


def backbone_params(cl: CLState):
    """The backbone's parameters: ``cl.frozen["backbone"]`` if it is frozen, else ``cl.shared["backbone"]``."""
    return cl.frozen["backbone"] if "backbone" in cl.frozen else cl.shared["backbone"]


def features(cl: CLState, ctx: Context, x, train: bool):
    """Backbone features and the new BatchNorm state."""
    f, stats = ctx.backbone.apply(backbone_params(cl), cl.state["backbone"], x, train)
    return f, {**cl.state, "backbone": stats}


def logits_from_features(cl: CLState, ctx: Context, f, tid):
    """Head logits; in TIL outputs beyond a task's class count are masked to -1e9."""
    if ctx.scenario == "til":
        out = head_logits(cl.per_task["head"], f, tid)
        return jnp.where(ctx.output_mask()[tid], out, NEG)
    return head_logits(cl.shared["head"], f)


def apply(cl: CLState, ctx: Context, x, tid, train: bool):
    """``(logits, new_state)`` for inputs ``x``; ``tid [B]`` is required in TIL."""
    f, state = features(cl, ctx, x, train)
    return logits_from_features(cl, ctx, f, tid), state


def cross_entropy(logits, y) -> jax.Array:
    """Mean softmax cross-entropy with integer targets."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def model(ctx: Context, frozen_backbone: bool = False, name: str = "classifier"):
    """The backbone + head as a :class:`clax.compose.Model`: the default model of the baselines.

    ``forward`` gives the logits of :func:`apply` and ``aux = {"features": f}``; ``outputs`` gives every
    task's head on those features (``[B, T, C]`` in TIL, unmasked) or the shared head's ``[B, K]`` (CIL).
    """
    from clax.compose import Model

    def forward(cl, x, tid, t, train, key):
        f, state = features(cl, ctx, x, train)
        return logits_from_features(cl, ctx, f, tid), {"features": f}, state

    def predict(cl, x, tid):
        return apply(cl, ctx, x, tid, train=False)[0]

    def outputs(cl, aux):
        f = aux["features"]
        if ctx.scenario == "til":
            head = cl.per_task["head"]
            return jnp.einsum("bd,tdc->btc", f, head["kernel"]) + head["bias"][None]
        return head_logits(cl.shared["head"], f)

    return Model(name, lambda key: init(key, ctx, frozen_backbone), forward, predict, outputs,
                 default=not frozen_backbone and name == "classifier")
