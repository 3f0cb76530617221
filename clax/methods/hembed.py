"""The H-embedding-guided hypernetwork (Wu et al., arXiv 2502.11609, NeurIPS 2025).

HNET (:mod:`clax.methods.hnet`) plus a prior on where a new task's embedding should sit. At the start
of task ``t`` (from the third task on, ``t >= 2``) every earlier task's generated network ``h(e_j)``
extracts penultimate features of up to ``hscore_samples`` samples of the new task; their H-scores
(:func:`clax.transforms.hscore.hscore`) become target distances and are solved for an H-embedding
``e_hat_t`` (:func:`~clax.transforms.hscore.solve_embedding`). Training then adds

    L_emb = min(0.05 t, 1) * (1 - cos(D(e_t), e_hat_t))

with ``D`` a decoder MLP (hidden ``decoder_hidden``) trained jointly with the hypernetwork.

Switches: ``guidance="h"`` (the method), ``"none"`` (no embedding loss: exactly HNET), ``"random"``
(the ablation: ``e_hat_t`` drawn uniform(0, 1) instead of solved from H-scores).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clax.methods.base import Context, Method, TaskData
from clax.methods.hnet import HNET_DEFAULTS, build_hnet, local_targets
from clax.transforms import hscore as HS
from clax.transforms import hypernet as H

HEMBED_DEFAULTS = {
    **HNET_DEFAULTS,
    "guidance": "h",
    "distance_form": "direct",
    "hscore_samples": 1000,
    "solve_steps": 2000,
    "solve_lr": 1e-3,
    "decoder_hidden": 512,
}
GUIDANCE = ("h", "none", "random")


def hembed(ctx: Context, **settings) -> Method:
    """H-embedding-guided HNET; the HNET settings plus ``guidance`` (h | none | random),
    ``distance_form`` (direct | reciprocal), ``hscore_samples``, ``solve_steps``, ``solve_lr`` and
    ``decoder_hidden``."""
    s = {**HEMBED_DEFAULTS, **settings}
    if s["guidance"] not in GUIDANCE:
        raise ValueError(f"hembed.guidance must be one of {', '.join(GUIDANCE)}, got {s['guidance']!r}")
    if s["distance_form"] not in ("direct", "reciprocal"):
        raise ValueError(f"hembed.distance_form must be 'direct' or 'reciprocal', got {s['distance_form']!r}")
    for k in ("hscore_samples", "solve_steps", "decoder_hidden"):
        if not isinstance(s[k], int) or s[k] <= 0:
            raise ValueError(f"hembed.{k} must be a positive integer, got {s[k]!r}")
    if s["guidance"] == "none":
        return build_hnet("hembed", ctx, s)
    T, E, cmax = ctx.num_tasks, s["task_emb_dim"], ctx.task_classes.shape[1]
    n = s["hscore_samples"]
    dec_sizes = (E, s["decoder_hidden"], E)

    def extra_init(key, cl):
        dec = H.mlp_init(jax.random.fold_in(key, 7), dec_sizes, True)
        return cl.replace(shared={**cl.shared, "decoder": dec},
                          extra={**cl.extra, "h_emb": jnp.zeros((T, E))})

    def extra_loss(cl, t):
        pred = H.mlp_apply(cl.shared["decoder"], cl.per_task["emb"][t], jax.nn.relu)
        l_cos = HS.cosine_embedding_loss(pred, cl.extra["h_emb"][t])
        w = HS.warmup_weight(t)
        return w * l_cos, {"emb": l_cos}

    def make_scores(parts):
        tgt, tc = parts["target"], parts["task_classes"]

        @jax.jit
        def scores(cl, x, y, w, t):
            yl = local_targets(tc, y, t) if ctx.scenario == "cil" else y

            def one(args):
                e, stats = args
                _, f, _ = tgt.forward(parts["generated"](cl.shared["hnet"], e), stats, x, False)
                return HS.hscore(f, yl, cmax, w)
            return jax.lax.map(one, (cl.per_task["emb"], cl.state["bn"]))   # [T]

        return scores

    cache = {}
    solve = jax.jit(HS.solve_embedding, static_argnames=("steps", "lr"))

    def extra_begin(cl, data: TaskData, parts):
        t = data.t
        if t < 2:  # the embedding loss starts at the third task
            return cl
        k_sample, k_solve = jax.random.split(jax.random.fold_in(data.key, 11))
        if s["guidance"] == "random":
            e_hat = jax.random.uniform(k_solve, (E,))
        else:
            if "scores" not in cache:
                cache["scores"] = make_scores(parts)
            m = min(n, data.x.shape[0])
            idx = np.resize(np.asarray(jax.random.permutation(k_sample, data.x.shape[0]))[:m], n)
            w = (np.arange(n) < m).astype(np.float32)
            h = cache["scores"](cl, data.x[idx], data.y[idx], w, jnp.int32(t))
            valid = jnp.arange(T) < t
            d = HS.distances(h, valid, s["distance_form"])
            e_hat, _ = solve(k_solve, d, cl.per_task["emb"], valid, steps=s["solve_steps"], lr=s["solve_lr"])
        return cl.replace(extra={**cl.extra, "h_emb": cl.extra["h_emb"].at[t].set(e_hat)})

    return build_hnet("hembed", ctx, s, extra_loss=extra_loss, extra_init=extra_init, extra_begin=extra_begin)
