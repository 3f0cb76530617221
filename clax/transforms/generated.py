"""The network a task-conditioned hypernetwork generates, as a :class:`clax.compose.Model` (HNET's).

A chunked hypernetwork (:func:`clax.transforms.hypernet.chunked`) generates the *whole* target network
— ``ctx.backbone`` and a head of ``C_max`` outputs — from a learned task embedding ``e_t``: the
hypernetwork (with its chunk embeddings) is ``cl.shared["hnet"]``, the embeddings are
``cl.per_task["emb"]`` (``[T, E]``, nothing else is stored per task) and the target's BatchNorm
statistics, where it has BatchNorm, are ``cl.state["bn"]`` (a row per task).

* ``forward`` runs task ``t``'s generated network (the task being trained) on every row: its outputs
  beyond task ``t``'s class count are masked to -1e9, and in training it updates BatchNorm row ``t`` and
  marks task ``t`` trained (``cl.state["seen"]``).
* ``targets``: TIL targets are already the task's local ids; in CIL the global labels are mapped to
  their index in the row's task's class list, so the chain's ``ce`` is HNET's cross-entropy of the task's
  generated head.
* ``predict``: TIL: the sample's task id picks the embedding. CIL: HNET+ENT (von Oswald et al. 2020) —
  every trained task's network predicts, the one whose softmax has the lowest entropy wins, and its
  outputs are placed at its global class ids.

The entropy rule is part of the model, not a prediction wrapper: it is the only way this network
predicts in CIL (there is no shared head to fall back on), it needs every task's generated network,
which only the model can run, and the tasks it picks among are those the model's own training marked
(a task is trained once a step of it has run), so the model is complete on its own and a wrapper could
add nothing but a dependency.

Shapes do not change with the task (the chunk count depends only on the target), so a new task adds
no compilation.

The output regulariser's lookahead with the optimizer's own step (von Oswald et al. 2020, the authors'
``utils/optim_step.py:calc_delta_theta``) is :func:`lookahead_regulariser`: it needs the step the
trainer's optimizer would take, which the trainer hands to the loss through :func:`optimizer_step`
while it traces the train step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from clax import partition as P
from clax.partition import CLState
from clax.transforms import hypernet as H
from clax.transforms.classifier import NEG, head_logits, init_head

if TYPE_CHECKING:  # a runtime import would cycle: clax.methods imports this module
    from clax.methods.base import Context


class Target(NamedTuple):
    """The generated network: a backbone plus a ``C_max``-wide head, and its hypernetwork."""

    hn: H.Hypernet
    forward: Callable  # (target params, bn stats, x, train) -> (logits [B, C], features [B, D], stats)
    init_stats: Callable  # key -> bn stats of one task


def local_targets(task_classes: jax.Array, y: jax.Array, t) -> jax.Array:
    """Global labels ``y [B]`` -> their index in task ``t``'s class list (CIL -> TIL targets); ``t`` a
    task id or one per sample (``[B]``)."""
    classes = task_classes[t] if jnp.ndim(t) else task_classes[t][None, :]
    return jnp.argmax(classes == y[:, None], axis=-1).astype(jnp.int32)


def make_target(ctx: Context, s: dict, name: str) -> Target:
    """The target network of ``ctx.backbone`` and its chunked hypernetwork from settings ``s``
    (``chunk_size``, ``task_emb_dim``, ``chunk_emb_dim``, ``hidden``); ``name`` prefixes bad settings."""
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


def model(ctx: Context, s: dict, target: Target, name: str = "hnet"):
    """The generated network of ``target`` as a :class:`clax.compose.Model` (see the module docstring);
    ``s["emb_std"]`` is the initial std of the task and chunk embeddings."""
    from clax.compose import Model

    hn, T = target.hn, ctx.num_tasks
    tc = jnp.asarray(ctx.task_classes)
    cmask = tc >= 0                                              # [T, C_max] valid outputs per task

    def init(key):
        kh, ke, kb = jax.random.split(key, 3)
        hparams = hn.init(kh)
        hparams["chunk_emb"] = hparams["chunk_emb"] * s["emb_std"]
        emb = s["emb_std"] * jax.random.normal(ke, (T, s["task_emb_dim"]))
        stats = P.stack_tasks(target.init_stats(kb), T)
        return CLState(frozen={}, shared={"hnet": hparams}, per_task={"emb": emb},
                       state={"bn": stats, "seen": jnp.zeros((T,), bool)}, extra={})

    def network(cl, e, stats, x, train):
        return target.forward(hn.apply(cl.shared["hnet"], e), stats, x, train)

    def forward(cl, x, tid, t, train, key):
        logits, f, stats = network(cl, cl.per_task["emb"][t], P.task_row(cl.state["bn"], t), x, train)
        state = {**cl.state, "bn": P.set_task_row(cl.state["bn"], t, stats)}
        if train:
            state["seen"] = cl.state["seen"].at[t].set(True)
        return jnp.where(cmask[t], logits, NEG), {"features": f}, state

    def targets(y, tid, t):
        return local_targets(tc, y, tid)

    def all_task_logits(cl, x):
        """``[T, B, C_max]`` logits of every task's generated network (invalid outputs masked)."""
        def one(e, stats, m):
            return jnp.where(m, network(cl, e, stats, x, False)[0], NEG)
        return jax.vmap(one)(cl.per_task["emb"], cl.state["bn"], cmask)

    def predict(cl, x, tid):
        out = all_task_logits(cl, x)
        if tid is not None:
            return jnp.take_along_axis(out, tid[None, :, None], axis=0)[0]
        p = jax.nn.softmax(out, axis=-1)
        ent = -jnp.sum(jnp.where(cmask[:, None, :], p * jnp.log(p + 1e-12), 0.0), axis=-1)  # [T, B]
        ent = jnp.where(cl.state["seen"][:, None], ent, jnp.inf)
        best = jnp.argmin(ent, axis=0)                                            # [B]
        local = jnp.take_along_axis(out, best[None, :, None], axis=0)[0]         # [B, C_max]
        place = jax.nn.one_hot(tc[best], ctx.num_outputs)                         # [B, C_max, K]; -1 -> 0
        glob = jnp.einsum("bc,bck->bk", local, place)
        return jnp.where(place.sum(1) > 0, glob, NEG)

    return Model(name, init, forward, predict, targets=targets if ctx.scenario == "cil" else None,
                 mixed_tasks=False)


# --- the lookahead with the optimizer's own step -------------------------------------------------------

from clax.compose import current_optimizer_step, optimizer_step  # noqa: E402,F401  (the trainer sets it)


def lookahead_regulariser(hn: H.Hypernet, num_tasks: int, beta: float, params: str = "hnet", emb: str = "emb",
                          name: str = "output_reg", setting: str = "hnet"):
    """HNET's output regulariser (:func:`clax.transforms.output_reg.transform`, same state and snapshot)
    evaluated after a lookahead by the OPTIMIZER's own step (``hnet.lookahead_step="optimizer"``):

        reg = 1/t sum_{j<t} || W(e_j; theta + dtheta) - W(e_j; theta*) ||^2,
        dtheta = stop_gradient(the update the trainer's optimizer would apply for dCE/dtheta)

    with ``theta`` the hypernetwork ``cl.shared[params]`` (its weights and chunk embeddings; the task
    embeddings take no lookahead) and CE the current task's cross-entropy through the chain's model. This is
    von Oswald et al.'s lookahead as the authors' code computes it (hypercl / viki760
    ``utils/optim_step.py:calc_delta_theta(theta_optimizer, use_sgd_change=False)``: Adam's step from its
    moments before this step and the current gradient, detached, ``--backprop_dt`` off), where
    ``lookahead_step="sgd"`` (:func:`clax.transforms.output_reg.transform`) stands in a plain gradient step.
    The update comes from the trainer's optimizer (:func:`optimizer_step`) for a gradient that is
    ``dCE/dtheta`` on ``theta`` and 0 elsewhere; with ``train.clip`` the clip's global norm is that of this
    gradient alone. One difference from the authors' code: from the third task on their ``p.grad`` also holds
    the H-embedding loss's gradient on the chunk embeddings when ``calc_delta_theta`` reads it
    (``train_Hemb.py:train`` calls ``loss_emb.backward()`` first); here the step is on the task loss alone.

    Raises:
      ValueError: ``beta < 0`` (naming ``{setting}.beta``); at trace time, a trainer that does not provide
        its optimizer's step (:func:`optimizer_step`), naming ``{setting}.lookahead_step``.
    """
    import jax.numpy as jnp
    import optax

    from clax.compose import state
    from clax.transforms import output_reg

    base = output_reg.transform(hn, num_tasks, beta, False, params=params, emb=emb, name=name, setting=setting)

    def loss(cl, view, batch, key, t):
        step = current_optimizer_step()
        if step is None:
            raise ValueError(f"{setting}.lookahead_step='optimizer' needs the step of the trainer's optimizer, "
                             "which this trainer does not provide (clax.transforms.generated.optimizer_step); "
                             f"use {setting}.lookahead_step=sgd")
        model = view.model
        const = jax.tree.map(jax.lax.stop_gradient, cl)  # dtheta is a constant of the loss (detached)

        def task_ce(hp):
            logits, _, _ = model.forward(const.replace(shared={**const.shared, params: hp}), batch["x"],
                                         batch["tid"], t, True, key)
            y = batch["y"] if model.targets is None else model.targets(batch["y"], batch["tid"], t)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        hparams = cl.shared[params]
        g = jax.grad(task_ce)(const.shared[params])
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        grads = {"shared": {**zeros(const.shared), params: g}, "task": zeros(P.task_row(const.per_task, t))}
        delta = jax.lax.stop_gradient(step(grads)["shared"][params])
        ahead = jax.tree.map(lambda p, d: p + d, hparams, delta)
        reg = output_reg.output_regulariser(hn, ahead, cl.per_task[emb], state(cl, name)["targets"], t)
        return beta * reg, {"reg": reg}

    return base._replace(loss=loss)
