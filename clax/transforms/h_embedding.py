"""The H-embedding guidance of Wu et al. (arXiv 2502.11609, NeurIPS 2025), a
:class:`clax.compose.Transform` on top of HNET's generated network (:mod:`clax.transforms.generated`).

At the start of task ``t`` (from the third task on, ``t >= 2``) every earlier task's generated network
``h(e_j)`` (the model's ``forward`` for task ``j``, its ``features``) extracts penultimate features of up
to ``hscore_samples`` samples of the new task; their H-scores (:func:`clax.transforms.hscore.hscore`)
become target distances and are solved for an H-embedding ``e_hat_t``
(:func:`~clax.transforms.hscore.solve_embedding`), kept in ``cl.extra[name]["h_emb"]`` (``[T, E]``).
Training then adds (term ``emb`` is the cosine term before its weight)

    L_emb = min(0.05 t, 1) * (1 - cos(D(phi(e_t)), e_hat_t))

with ``D`` a decoder MLP (one hidden layer of ``decoder_hidden``, ReLU) and one cosine over the whole
``[E]`` vector. ``phi`` (``decoder_input``): ``"chunks"``, the hypernetwork's last hidden activation for
every chunk flattened chunk by chunk (``Hypernet.hidden``), or ``"embedding"``, ``e_t`` itself. The
decoder (``decoder``): ``"per_task"``, a fresh decoder at ``begin_task`` from the third task on (PyTorch
``nn.Linear``'s default initialisation, :func:`decoder_init`) trained on ``L_emb`` only by its own Adam
at ``decoder_lr``, stepped on the same forward as the main step (the ``step`` hook: the gradient at the
pre-update hypernetwork; decoder and Adam state in ``cl.extra[name]``, checkpointed with the run);
or ``"shared"``, one decoder for the whole stream in ``cl.shared["decoder"]`` (LeCun-normal kernels,
zero biases, :func:`shared_decoder`) trained by the trainer's optimizer. ``guidance="random"`` draws
``e_hat_t`` at random (``random_dist``: ``"normal"`` or ``"uniform"`` on [0, 1)) instead of solving it.
Whose each choice is: :mod:`clax.methods.hembed`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.compose import Model, Transform, state, with_state
from clax.models import jit_init
from clax.transforms import hscore as HS
from clax.transforms import hypernet as H


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


def decoder_sizes(hn: H.Hypernet, task_emb_dim: int, decoder_hidden: int, decoder_input: str) -> tuple:
    """``(input, hidden, E)``: the decoder's widths for ``phi`` = ``decoder_input`` of ``hn``."""
    if decoder_input == "chunks":
        shape = jax.eval_shape(lambda k: hn.hidden(hn.init(k), jnp.zeros((task_emb_dim,))), jax.random.PRNGKey(0))
        return (int(np.prod(shape.shape)), decoder_hidden, task_emb_dim)
    return (task_emb_dim, decoder_hidden, task_emb_dim)


def shared_decoder(model: Model, sizes) -> Model:
    """``model`` whose ``init`` also holds a decoder of ``sizes`` in ``cl.shared["decoder"]`` (LeCun-normal
    kernels, zero biases), trained by the trainer's optimizer (``decoder="shared"``)."""
    def init(key):
        cl = model.init(key)
        return cl.replace(shared={**cl.shared, "decoder": H.mlp_init(jax.random.fold_in(key, 7), sizes, True)})
    return model._replace(init=init)


def transform(hn: H.Hypernet, num_tasks: int, num_classes: int, task_emb_dim: int, guidance: str = "h",
              distance_form: str = "direct", hscore_samples: int = 1000, solve_steps: int = 2000,
              solve_lr: float = 1e-3, decoder_hidden: int = 512, decoder_input: str = "chunks",
              decoder: str = "per_task", decoder_lr: float = 1e-3, random_dist: str = "normal",
              params: str = "hnet", emb: str = "emb", name: str = "h_embedding") -> Transform:
    """The guidance of hypernetwork ``hn`` (``cl.shared[params]``, embeddings ``cl.per_task[emb]`` of
    ``task_emb_dim``) for ``num_tasks`` tasks of at most ``num_classes`` classes (see the module docstring);
    ``guidance`` is ``"h"`` or ``"random"``. With ``decoder="shared"`` the model must come from
    :func:`shared_decoder`."""
    T, E, n = num_tasks, task_emb_dim, hscore_samples
    sizes = decoder_sizes(hn, E, decoder_hidden, decoder_input)
    per_task = decoder == "per_task"
    dtx = optax.adam(decoder_lr)
    solve = jax.jit(HS.solve_embedding, static_argnames=("steps", "lr"))

    def fresh_decoder(key):
        dec = decoder_init(key, sizes)
        return {"decoder": dec, "decoder_opt": dtx.init(dec)}

    # at each task's start: one compiled program, not eager draws; the same values (tested)
    compiled_fresh_decoder = jit_init(fresh_decoder)

    def init(key, cl):
        st = {"h_emb": jnp.zeros((T, E))}
        return {**st, **fresh_decoder(jax.random.fold_in(key, 7))} if per_task else st

    def phi(cl, t):
        """The decoder's input for task ``t``'s embedding (``[sizes[0]]``)."""
        e = cl.per_task[emb][t]
        return hn.hidden(cl.shared[params], e).reshape(-1) if decoder_input == "chunks" else e

    def cos_loss(dec, feats, e_hat):
        """``1 - cos(D(phi(e_t)), e_hat_t)``: one cosine over the decoded ``[E]`` vector."""
        return HS.cosine_embedding_loss(H.mlp_apply(dec, feats, jax.nn.relu), e_hat)

    def loss(cl, view, batch, key, t):
        dec = state(cl, name)["decoder"] if per_task else cl.shared["decoder"]
        l_cos = cos_loss(dec, phi(cl, t), state(cl, name)["h_emb"][t])  # reaches the hypernetwork and e_t
        return HS.warmup_weight(t) * l_cos, {"emb": l_cos}

    def step(cl, view, batch, key, t):
        # The decoder's own Adam step on L_emb from the same forward, i.e. at the pre-update hypernetwork
        # (the authors take both steps from one backward pass, the decoder's first).
        st = state(cl, name)
        feats, e_hat, w = jax.lax.stop_gradient(phi(cl, t)), st["h_emb"][t], HS.warmup_weight(t)
        g = jax.grad(lambda d: w * cos_loss(d, feats, e_hat))(st["decoder"])
        upd, opt = dtx.update(g, st["decoder_opt"], st["decoder"])
        return {**st, "decoder": optax.apply_updates(st["decoder"], upd), "decoder_opt": opt}

    @functools.partial(jax.jit, static_argnums=0)
    def scores(model, cl, x, y, w, t):
        """``[T]`` H-scores of every task's generated features on task ``t``'s samples (local labels)."""
        yl = y if model.targets is None else model.targets(y, jnp.full(y.shape, t, jnp.int32), t)

        def one(j):
            _, aux, _ = model.forward(cl, x, None, j, False, None)
            return HS.hscore(aux["features"], yl, num_classes, w)
        return jax.lax.map(one, jnp.arange(T))

    def begin_task(cl, data):
        t = data.t
        if t < 2:  # the embedding loss starts at the third task
            return cl
        k_sample, k_solve = jax.random.split(jax.random.fold_in(data.key, 11))
        k_dec = jax.random.fold_in(data.key, 13)
        if guidance == "random":
            draw = jax.random.normal if random_dist == "normal" else jax.random.uniform
            e_hat = draw(k_solve, (E,))
        else:
            m = min(n, data.x.shape[0])
            idx = np.resize(np.asarray(jax.random.permutation(k_sample, data.x.shape[0]))[:m], n)
            w = (np.arange(n) < m).astype(np.float32)
            h = scores(data.model, cl, data.x[idx], data.y[idx], w, jnp.int32(t))
            valid = jnp.arange(T) < t
            d = HS.distances(h, valid, distance_form)
            e_hat, _ = solve(k_solve, d, cl.per_task[emb], valid, steps=solve_steps, lr=solve_lr)
        st = state(cl, name)
        st = {**st, "h_emb": st["h_emb"].at[t].set(e_hat), **(compiled_fresh_decoder(k_dec) if per_task else {})}
        return with_state(cl, name, st)

    return Transform(name, init=init, begin_task=begin_task, loss=loss, step=step if per_task else None)
