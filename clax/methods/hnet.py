"""HNET: the task-conditioned hypernetwork of von Oswald et al. (ICLR 2020).

A chunked hypernetwork (:func:`clax.transforms.hypernet.chunked`) generates the *whole* target
network — backbone and a head of ``C_max`` outputs — from a learned task embedding ``e_t``; nothing
but the embeddings (``cl.per_task["emb"]``, ``[T, E]``) is stored per task, plus the target's
BatchNorm statistics where it has BatchNorm (``cl.state["bn"]``, a row per task). While task ``t``
trains, only ``e_t`` and the hypernetwork (with its chunk embeddings) are trained, against

    CE + beta * 1/t * sum_{j<t} || W(e_j; theta*) - W(e_j; theta) ||^2

where ``W(e; theta)`` are the GENERATED WEIGHTS — the hypernetwork's outputs after the layout's
per-leaf affine ``shift + scale * raw`` (:class:`clax.transforms.hypernet.Layout`), i.e. the target
network's parameters — and the squared norm sums over all of the target's leaves. This is the
authors' regulariser (hypercl / viki760 ``utils/hnet_regularizer.py:calc_fix_target_reg``: the squared
distance between the flattened weight tensors that ``hnet.forward`` returns, the main network's
weights), so ``beta`` means what it means in the paper whatever scale the target's leaves have.
``W(e_j; theta*)`` are the generated weights for the earlier tasks' embeddings taken by ``begin_task``
before task ``t`` (kept flat in layout order in ``cl.extra["targets"]``, ``[T, P]``). With
``lookahead`` the regulariser is evaluated at ``theta - lookahead_lr * stop_grad(dCE/dtheta)`` (the
one-step lookahead of the paper; a plain gradient step stands in for the optimizer's step). TIL: the
sample's task id picks the embedding. CIL: HNET+ENT — every trained task's network predicts, and the
one whose softmax has the lowest entropy wins; its outputs are placed at its global class ids.

Shapes do not change with the task (the chunk count depends only on the target), so a new task adds
no compilation.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from clax import partition as P
from clax.methods.base import Context, Method, TaskData
from clax.settings import NON_NEGATIVE, POSITIVE, POSITIVE_INT, WIDTHS, check_settings
from clax.partition import CLState
from clax.transforms import hypernet as H
from clax.transforms.classifier import NEG, cross_entropy, head_logits, init_head

HNET_DEFAULTS = {
    "chunk_size": 2000,
    "task_emb_dim": 32,
    "chunk_emb_dim": 32,
    "hidden": [100, 100],
    "beta": 0.05,
    "lookahead": False,
    "lookahead_lr": 1e-3,
    "emb_std": 1.0,
}
HNET_RULES = {"chunk_size": POSITIVE_INT, "task_emb_dim": POSITIVE_INT, "chunk_emb_dim": POSITIVE_INT,
              "hidden": WIDTHS, "beta": NON_NEGATIVE, "lookahead_lr": POSITIVE, "emb_std": POSITIVE}


class Target(NamedTuple):
    """The generated network: a backbone plus a ``C_max``-wide head, and its hypernetwork."""

    hn: H.Hypernet
    forward: Callable  # (target params, bn stats, x, train) -> (logits [B, C], features [B, D], stats)
    init_stats: Callable  # key -> bn stats of one task


def local_targets(task_classes: jax.Array, y: jax.Array, t) -> jax.Array:
    """Global labels ``y [B]`` -> their index in task ``t``'s class list (CIL -> TIL targets)."""
    return jnp.argmax(task_classes[t][None, :] == y[:, None], axis=-1).astype(jnp.int32)


def make_target(ctx: Context, s: dict, name: str) -> Target:
    """The target network of ``ctx.backbone`` and its chunked hypernetwork from settings ``s``."""
    cmax = ctx.task_classes.shape[1]
    d = ctx.backbone.feature_dim

    def target_init(key):
        kb, kh = jax.random.split(key)
        return {"backbone": ctx.backbone.init(kb)[0], "head": init_head(kh, d, cmax)}

    lay = H.layout(target_init, key=jax.random.PRNGKey(0))
    hn = H.chunked(lay, s["chunk_size"], s["task_emb_dim"], s["chunk_emb_dim"], s["hidden"], name=name)

    def forward(params, stats, x, train):
        f, stats = ctx.backbone.apply(params["backbone"], stats, x, train)
        return head_logits(params["head"], f), f, stats

    return Target(hn, forward, lambda key: ctx.backbone.init(key)[1])


def hnet(ctx: Context, **settings) -> Method:
    """HNET with settings ``chunk_size``, ``task_emb_dim``, ``chunk_emb_dim``, ``hidden`` (the
    hypernetwork's widths), ``beta``, ``lookahead``, ``lookahead_lr`` and ``emb_std`` (initial std of
    the task and chunk embeddings)."""
    return build_hnet("hnet", ctx, check_settings("hnet", HNET_DEFAULTS, settings, HNET_RULES))


def output_regulariser(hn: H.Hypernet, hparams, embs: jax.Array, targets: jax.Array, t) -> jax.Array:
    """``1/t * sum_{j<t} || W(e_j; hparams) - targets_j ||^2`` (0 at ``t = 0``).

    ``embs [T, E]`` task embeddings, ``targets [T, P]`` generated weights (flat, layout order, see
    :func:`clax.transforms.hypernet.generated_flat`); rows ``j >= t`` are ignored. The distance is in
    weight units: it sums ``||W_leaf(e_j; hparams) - W_leaf*||^2`` over the target's leaves.
    """
    out = jax.vmap(lambda e: H.generated_flat(hn, hparams, e))(embs)     # [T, P] generated weights
    sq = jnp.sum((out - targets) ** 2, axis=-1)
    return jnp.sum(jnp.where(jnp.arange(embs.shape[0]) < t, sq, 0.0)) / jnp.maximum(t, 1)


def build_hnet(name: str, ctx: Context, s: dict, extra_loss: Callable | None = None,
               extra_init: Callable | None = None, extra_begin: Callable | None = None,
               target: Target | None = None) -> Method:
    """The HNET method; ``extra_loss(cl, t) -> (scalar, new cl.state, metrics)`` adds a term to the
    loss (and may update ``cl.state``, e.g. a decoder with its own optimizer),
    ``extra_init(key, cl) -> cl`` and ``extra_begin(cl, data, parts) -> cl`` extend ``init`` and
    ``begin_task`` (the H-embedding guidance of :mod:`clax.methods.hembed` plugs in here); ``target``
    a :class:`Target` already made by :func:`make_target` from the same settings."""
    if s["beta"] < 0:
        raise ValueError(f"{name}.beta must be >= 0, got {s['beta']}")
    tgt = target if target is not None else make_target(ctx, s, name)
    hn, T = tgt.hn, ctx.num_tasks
    tc = jnp.asarray(ctx.task_classes)
    cmask = tc >= 0                                              # [T, C_max] valid outputs per task

    def init(key):
        kh, ke, kb = jax.random.split(key, 3)
        hparams = hn.init(kh)
        hparams["chunk_emb"] = hparams["chunk_emb"] * s["emb_std"]
        emb = s["emb_std"] * jax.random.normal(ke, (T, s["task_emb_dim"]))
        stats = P.stack_tasks(tgt.init_stats(kb), T)
        cl = CLState(frozen={}, shared={"hnet": hparams}, per_task={"emb": emb}, state={"bn": stats},
                     extra={"targets": jnp.zeros((T, hn.layout.num_params)), "seen": jnp.zeros((T,), bool)})
        return extra_init(key, cl) if extra_init else cl

    def generated(hparams, e):
        return hn.apply(hparams, e)

    def task_ce(hparams, e, stats, batch, t, train=True):
        logits, f, new_stats = tgt.forward(generated(hparams, e), stats, batch["x"], train)
        logits = jnp.where(cmask[t], logits, NEG)
        y = batch["y"] if ctx.scenario == "til" else local_targets(tc, batch["y"], t)
        return cross_entropy(logits, y), new_stats

    def loss(cl, batch, key, t):
        hparams, e = cl.shared["hnet"], cl.per_task["emb"][t]
        stats = P.task_row(cl.state["bn"], t)
        ce, new_stats = task_ce(hparams, e, stats, batch, t)
        hp_reg = hparams
        if s["lookahead"]:
            g = jax.grad(lambda hp: task_ce(hp, e, stats, batch, t)[0])(hparams)
            hp_reg = jax.tree.map(lambda p, gi: p - s["lookahead_lr"] * jax.lax.stop_gradient(gi), hparams, g)
        reg = output_regulariser(hn, hp_reg, cl.per_task["emb"], cl.extra["targets"], t)
        total = ce + s["beta"] * reg
        metrics = {"ce": ce, "reg": reg}
        state = cl.state
        if extra_loss is not None:
            l_extra, state, m_extra = extra_loss(cl, t)
            total = total + l_extra
            metrics.update(m_extra)
        state = {**state, "bn": P.set_task_row(cl.state["bn"], t, new_stats)}
        return total, (state, {"loss": total, **metrics})

    @jax.jit
    def all_weights(hparams, embs):
        return jax.vmap(lambda e: H.generated_flat(hn, hparams, e))(embs)

    def begin_task(cl, data: TaskData):
        # theta* snapshot: the generated weights for every embedding before task t trains.
        cl = cl.replace(extra={**cl.extra, "targets": all_weights(cl.shared["hnet"], cl.per_task["emb"])})
        return extra_begin(cl, data, parts) if extra_begin else cl

    def end_task(cl, data: TaskData):
        return cl.replace(extra={**cl.extra, "seen": cl.extra["seen"].at[data.t].set(True)})

    def all_task_logits(cl, x):
        """``[T, B, C_max]`` logits of every task's generated network (invalid outputs masked)."""
        def one(e, stats, m):
            logits, _, _ = tgt.forward(generated(cl.shared["hnet"], e), stats, x, False)
            return jnp.where(m, logits, NEG)
        return jax.vmap(one)(cl.per_task["emb"], cl.state["bn"], cmask)

    def predict(cl, x, tid):
        out = all_task_logits(cl, x)
        if tid is not None:
            return jnp.take_along_axis(out, tid[None, :, None], axis=0)[0]
        p = jax.nn.softmax(out, axis=-1)
        ent = -jnp.sum(jnp.where(cmask[:, None, :], p * jnp.log(p + 1e-12), 0.0), axis=-1)  # [T, B]
        ent = jnp.where(cl.extra["seen"][:, None], ent, jnp.inf)
        best = jnp.argmin(ent, axis=0)                                            # [B]
        local = jnp.take_along_axis(out, best[None, :, None], axis=0)[0]         # [B, C_max]
        place = jax.nn.one_hot(tc[best], ctx.num_outputs)                         # [B, C_max, K]; -1 -> 0
        glob = jnp.einsum("bc,bck->bk", local, place)
        return jnp.where(place.sum(1) > 0, glob, NEG)

    parts = {"target": tgt, "task_classes": tc, "generated": generated, "hn": hn}
    return Method(name, init, loss, predict, begin_task=begin_task, end_task=end_task)


def generated_weights(method_cl: CLState, ctx: Context, t: int, settings: dict | None = None) -> dict:
    """Task ``t``'s generated target parameters (host-side helper for tests and inspection)."""
    s = {**HNET_DEFAULTS, **(settings or {})}
    tgt = make_target(ctx, s, "hnet")
    return tgt.hn.apply(method_cl.shared["hnet"], method_cl.per_task["emb"][t])
