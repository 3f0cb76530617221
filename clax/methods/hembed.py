"""The H-embedding-guided hypernetwork (Wu et al., arXiv 2502.11609, NeurIPS 2025).

HNET's chain (:mod:`clax.methods.hnet`: the generated network and the output regulariser) plus one
transform, :func:`clax.transforms.h_embedding.transform` (``h_embedding``): a prior on where a new
task's embedding should sit. At the start of task ``t`` (from the third task on, ``t >= 2``) every
earlier task's generated network ``h(e_j)`` extracts penultimate features of up to ``hscore_samples``
samples of the new task; their H-scores (:func:`clax.transforms.hscore.hscore`) become target distances
and are solved for an H-embedding ``e_hat_t`` (:func:`~clax.transforms.hscore.solve_embedding`).
Training then adds

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
  and its Adam state live in ``cl.extra["h_embedding"]`` (``decoder``, ``decoder_opt``), stepped by the
  transform's ``step`` hook from the loss's forward pass, so they are checkpointed with the run and a
  resumed run continues exactly.
  ``"shared"``: one decoder for the whole stream in ``cl.shared`` (LeCun-normal kernels, zero
  biases), trained by the trainer's optimizer (clax's earlier choice).
* ``random_dist`` (the ablation ``guidance="random"``): ``"normal"`` (default, the authors':
  ``torch.randn(temb_size)`` in ``train_Hemb.py:train``) or ``"uniform"`` on [0, 1) (clax's earlier
  choice, the solve's initialisation).

Switches: ``guidance="h"`` (the method), ``"none"`` (no embedding loss: exactly HNET), ``"random"``
(the ablation: ``e_hat_t`` drawn at random instead of solved from H-scores).
"""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.methods.hnet import HNET_DEFAULTS, HNET_HELP, HNET_RULES, hnet_parts
from clax.settings import POSITIVE, POSITIVE_INT, check_settings, one_of
from clax.transforms import h_embedding
from clax.transforms.h_embedding import decoder_init  # noqa: F401  (the API of before)

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
GUIDANCE_SETTINGS = ("guidance", "distance_form", "hscore_samples", "solve_steps", "solve_lr", "decoder_hidden",
                     "decoder_input", "decoder", "decoder_lr", "random_dist")
#: one line per setting, as ``clax list hembed`` prints it
HEMBED_HELP = {
    **HNET_HELP,
    "guidance": "h: H-score embeddings; none: plain HNET; random: the ablation",
    "distance_form": "target distance from the H-score: direct or reciprocal",
    "hscore_samples": "new-task samples whose features give the H-scores",
    "solve_steps": "gradient steps solving for the H-embedding",
    "solve_lr": "learning rate of that solve",
    "decoder_hidden": "hidden width of the embedding decoder",
    "decoder_input": "what the decoder reads: the chunks' activations or the task embedding",
    "decoder": "a fresh decoder per task (authors') or one shared decoder",
    "decoder_lr": "learning rate of the per-task decoder's own Adam",
    "random_dist": "distribution of the random embeddings of guidance=random",
}


def hembed(ctx: Context, **settings) -> Method:
    """H-embedding-guided HNET; the HNET settings plus ``guidance`` (h | none | random),
    ``distance_form`` (direct | reciprocal), ``hscore_samples``, ``solve_steps``, ``solve_lr``,
    ``decoder_hidden``, ``decoder_input`` (chunks | embedding), ``decoder`` (per_task | shared),
    ``decoder_lr`` and ``random_dist`` (normal | uniform); see the module docstring for whose each
    choice is."""
    s = check_settings("hembed", HEMBED_DEFAULTS, settings, HEMBED_RULES)
    model, transforms, target = hnet_parts(ctx, s, "hembed")
    if s["guidance"] == "none":  # exactly HNET
        return chain(model, *transforms, name="hembed")
    guide = h_embedding.transform(target.hn, ctx.num_tasks, ctx.task_classes.shape[1], s["task_emb_dim"],
                                  **{k: s[k] for k in GUIDANCE_SETTINGS})
    if s["decoder"] == "shared":  # a parameter of the network, trained by the trainer's optimizer
        model = h_embedding.shared_decoder(model, h_embedding.decoder_sizes(
            target.hn, s["task_emb_dim"], s["decoder_hidden"], s["decoder_input"]))
    return chain(model, *transforms, guide, name="hembed")
