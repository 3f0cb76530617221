"""The H-embedding-guided hypernetwork (Wu et al., arXiv 2502.11609, NeurIPS 2025).

HNET (:mod:`clax.methods.hnet`) plus a prior on where a new task's embedding should sit. At the start
of task ``t`` (from the third task on, ``t >= 2``) every earlier task's generated network ``h(e_j)``
extracts penultimate features of up to ``hscore_samples`` samples of the new task; their H-scores
(:func:`clax.transforms.hscore.hscore`) become target distances and are solved for an H-embedding
``e_hat_t`` (:func:`~clax.transforms.hscore.solve_embedding`). Training then adds

    L_emb = min(0.05 t, 1) * (1 - cos(D(phi(e_t)), e_hat_t))

with ``D`` a decoder MLP (one hidden layer of ``decoder_hidden``, ReLU) and one cosine over the whole
``[E]`` vector. Where the paper is silent the defaults follow the authors' code
(viki760/H-embedding_guided_hypernet-for-review-); each other choice is kept as a setting:

* ``decoder_input``: what ``phi(e_t)`` is. ``"chunks"`` (default, the authors'): the hypernetwork's
  last hidden activation for every chunk, ``[num_chunks, width]`` flattened chunk by chunk, which is
  ``[e_t; c_i]`` over all chunks ``i`` when the hypernetwork has no hidden layer (their ResNet-32
  one); ``L_emb`` then reaches the hypernetwork and the chunk embeddings as well as ``e_t``
  (``cifar/train/train_Hemb.py:train``: ``hnet.forward(task_id, emb_reg=True).view(-1)`` fed to the
  ``EmbDecoder`` of ``cifar/train/fc_decoder.py``, input size ``hnet.get_hidden_dim()``;
  ``utils/chunked_hyper_model.py:ChunkedHyperNetworkHandler.forward`` and
  ``utils/hyper_model.py:HyperNetwork.forward`` with ``emb_reg=True`` return that activation, the
  input ``cat([task_emb, chunk_emb])`` itself where ``--hnet_arch`` is empty, as
  ``utils/sim_utils.py:get_hnet_model`` builds it for ResNet-32).
  ``"embedding"``: ``D(e_t)`` on the task embedding alone (clax's earlier choice).
* ``decoder``: ``"per_task"`` (default, the authors'): a fresh decoder at the start of every task
  from the third on (PyTorch ``nn.Linear``'s default initialisation, uniform within
  ``1/sqrt(fan_in)``), trained on ``L_emb`` only by its own Adam at ``decoder_lr`` (1e-3, their
  ``--emb_lr``), stepped on the same forward as the main step (``train_Hemb.py:train`` builds
  ``EmbDecoder`` and ``optim.Adam(decoder.parameters(), lr=config.emb_lr)`` inside the per-task
  ``train`` and calls ``decoder_optimizer.step()`` before ``theta_optimizer.step()``). The decoder
  and its Adam state live in ``cl.state["decoder"]`` / ``cl.state["decoder_opt"]``: the loss returns
  them updated, so they are checkpointed with the run and a resumed run continues exactly.
  ``"shared"``: one decoder for the whole stream in ``cl.shared`` (LeCun-normal kernels, zero
  biases), trained by the trainer's optimizer (clax's earlier choice).
* ``random_dist`` (the ablation ``guidance="random"``): ``"normal"`` (default, the authors':
  ``torch.randn(temb_size)`` in ``train_Hemb.py:train``) or ``"uniform"`` on [0, 1) (clax's earlier
  choice, the solve's initialisation).

Switches: ``guidance="h"`` (the method), ``"none"`` (no embedding loss: exactly HNET), ``"random"``
(the ablation: ``e_hat_t`` drawn at random instead of solved from H-scores).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.methods.base import Context, Method, TaskData
from clax.methods.hnet import HNET_DEFAULTS, HNET_RULES, build_hnet, local_targets, make_target
from clax.settings import POSITIVE, POSITIVE_INT, check_settings, one_of
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
    "decoder_input": "chunks",
    "decoder": "per_task",
    "decoder_lr": 1e-3,
    "random_dist": "normal",
}
GUIDANCE = ("h", "none", "random")
CHOICES = {"guidance": GUIDANCE, "distance_form": ("direct", "reciprocal"),
           "decoder_input": ("chunks", "embedding"), "decoder": ("per_task", "shared"),
           "random_dist": ("normal", "uniform")}
HEMBED_RULES = {**HNET_RULES, **{k: one_of(*v) for k, v in CHOICES.items()}, "hscore_samples": POSITIVE_INT,
                "solve_steps": POSITIVE_INT, "solve_lr": POSITIVE, "decoder_hidden": POSITIVE_INT,
                "decoder_lr": POSITIVE}


def decoder_init(key: jax.Array, sizes) -> list[dict]:
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` initialised as PyTorch's ``nn.Linear`` by default:
    kernel and bias uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (the authors' ``EmbDecoder``)."""
    layers = []
    for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(k)
        bound = 1.0 / math.sqrt(a)
        layers.append({"kernel": jax.random.uniform(kw, (a, b), minval=-bound, maxval=bound),
                       "bias": jax.random.uniform(kb, (b,), minval=-bound, maxval=bound)})
    return layers


def hembed(ctx: Context, **settings) -> Method:
    """H-embedding-guided HNET; the HNET settings plus ``guidance`` (h | none | random),
    ``distance_form`` (direct | reciprocal), ``hscore_samples``, ``solve_steps``, ``solve_lr``,
    ``decoder_hidden``, ``decoder_input`` (chunks | embedding), ``decoder`` (per_task | shared),
    ``decoder_lr`` and ``random_dist`` (normal | uniform); see the module docstring for whose each
    choice is."""
    s = check_settings("hembed", HEMBED_DEFAULTS, settings, HEMBED_RULES)
    if s["guidance"] == "none":
        return build_hnet("hembed", ctx, s)
    tgt = make_target(ctx, s, "hembed")
    hn = tgt.hn
    T, E = ctx.num_tasks, s["task_emb_dim"]
    cmax = ctx.task_classes.shape[1]
    n = s["hscore_samples"]
    if s["decoder_input"] == "chunks":
        width = s["hidden"][-1] if len(s["hidden"]) else s["task_emb_dim"] + s["chunk_emb_dim"]
        dec_in = hn.num_chunks * width
    else:
        dec_in = E
    dec_sizes = (dec_in, s["decoder_hidden"], E)
    per_task = s["decoder"] == "per_task"
    dtx = optax.adam(s["decoder_lr"])

    def fresh_decoder(key):
        dec = decoder_init(key, dec_sizes)
        return {"decoder": dec, "decoder_opt": dtx.init(dec)}

    def extra_init(key, cl):
        k = jax.random.fold_in(key, 7)
        extra = {**cl.extra, "h_emb": jnp.zeros((T, E))}
        if per_task:
            return cl.replace(state={**cl.state, **fresh_decoder(k)}, extra=extra)
        return cl.replace(shared={**cl.shared, "decoder": H.mlp_init(k, dec_sizes, True)}, extra=extra)

    def phi(hparams, e):
        """The decoder's input for embedding ``e`` (``[dec_in]``)."""
        return hn.hidden(hparams, e).reshape(-1) if s["decoder_input"] == "chunks" else e

    def cos_loss(dec, feats, e_hat):
        """``1 - cos(D(phi(e_t)), e_hat_t)``: one cosine over the decoded ``[E]`` vector."""
        return HS.cosine_embedding_loss(H.mlp_apply(dec, feats, jax.nn.relu), e_hat)

    def extra_loss(cl, t):
        feats = phi(cl.shared["hnet"], cl.per_task["emb"][t])
        e_hat, w = cl.extra["h_emb"][t], HS.warmup_weight(t)
        if not per_task:
            l_cos = cos_loss(cl.shared["decoder"], feats, e_hat)
            return w * l_cos, cl.state, {"emb": l_cos}
        dec = cl.state["decoder"]
        l_cos = cos_loss(dec, feats, e_hat)   # reaches the hypernetwork and e_t; the decoder is state
        # The decoder's own Adam step on L_emb from the same forward, i.e. at the pre-update hypernetwork
        # (the authors take both steps from one backward pass, the decoder's first).
        g = jax.grad(lambda d: w * cos_loss(d, jax.lax.stop_gradient(feats), e_hat))(dec)
        upd, opt = dtx.update(g, cl.state["decoder_opt"], dec)
        state = {**cl.state, "decoder": optax.apply_updates(dec, upd), "decoder_opt": opt}
        return w * l_cos, state, {"emb": l_cos}

    def make_scores(parts):
        tc = parts["task_classes"]

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
        k_dec = jax.random.fold_in(data.key, 13)
        if s["guidance"] == "random":
            draw = jax.random.normal if s["random_dist"] == "normal" else jax.random.uniform
            e_hat = draw(k_solve, (E,))
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
        state = {**cl.state, **fresh_decoder(k_dec)} if per_task else cl.state
        return cl.replace(state=state, extra={**cl.extra, "h_emb": cl.extra["h_emb"].at[t].set(e_hat)})

    return build_hnet("hembed", ctx, s, extra_loss=extra_loss, extra_init=extra_init, extra_begin=extra_begin,
                      target=tgt)
