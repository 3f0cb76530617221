"""HNET: the task-conditioned hypernetwork of von Oswald et al. (ICLR 2020), as a chain.

* Model :func:`clax.transforms.generated.model`: a chunked hypernetwork generates the *whole* target
  network — backbone and a head of ``C_max`` outputs — from a learned task embedding ``e_t``; nothing but
  the embeddings (``cl.per_task["emb"]``, ``[T, E]``) is stored per task, plus the target's BatchNorm
  statistics where it has BatchNorm (``cl.state["bn"]``, a row per task). While task ``t`` trains, only
  ``e_t`` and the hypernetwork (with its chunk embeddings) are trained. TIL: the sample's task id picks
  the embedding. CIL: HNET+ENT — every trained task's network predicts, and the one whose softmax has
  the lowest entropy wins; its outputs are placed at its global class ids (each task's generated head
  trains on the task's local ids).
* Transform :func:`clax.transforms.output_reg.transform` (``output_reg``): the output regulariser
  ``beta * 1/t * sum_{j<t} || W(e_j; theta*) - W(e_j; theta) ||^2`` on the GENERATED WEIGHTS (the
  target network's parameters, after the layout's per-leaf affine), the authors' regulariser (hypercl /
  viki760 ``utils/hnet_regularizer.py:calc_fix_target_reg``), so ``beta`` means what it means in the
  paper whatever scale the target's leaves have; ``theta*`` is snapshotted by ``begin_task``, with
  ``lookahead`` the one-step lookahead of the paper: ``theta`` moved by one step on the task's
  cross-entropy before the regulariser is evaluated. ``lookahead_step`` says which step:
  ``"sgd"`` (default, clax's earlier choice): a plain gradient step of ``lookahead_lr``;
  ``"optimizer"`` (von Oswald et al.'s and the H-embedding authors': hypercl / viki760
  ``utils/optim_step.py:calc_delta_theta``): the step the trainer's optimizer would take (Adam's, from its
  moments so far, at the epoch's learning rate), :func:`clax.transforms.generated.lookahead_regulariser`.
* ``hidden=[]``: a linear hypernetwork, ``[e_t; c_i] -> chunk i`` by one affine map (the authors'
  ResNet-32 hypernetwork, ``--hnet_arch=''``).

So the loss is the chain's ``ce`` plus ``beta * reg``. Shapes do not change with the task, so a new task
adds no compilation. The model joins other methods' transforms with ``+`` (``ewc+hnet``: EWC's Fisher
and anchor over the hypernetwork, ``cl.shared``).
"""
from __future__ import annotations

from clax.compose import Model, Transform, chain
from clax.methods.base import Context, Method
from clax.partition import CLState
from clax.settings import NON_NEGATIVE, POSITIVE, POSITIVE_INT, WIDTHS, check_settings, one_of
from clax.transforms import generated, output_reg
from clax.transforms.generated import Target, local_targets, make_target  # noqa: F401  (the API of before)
from clax.transforms.output_reg import output_regulariser  # noqa: F401

HNET_DEFAULTS = {
    "chunk_size": 2000,
    "task_emb_dim": 32,
    "chunk_emb_dim": 32,
    "hidden": [100, 100],
    "beta": 0.05,
    "lookahead": False,
    "lookahead_lr": 1e-3,
    "lookahead_step": "sgd",
    "emb_std": 1.0,
}
HNET_RULES = {"chunk_size": POSITIVE_INT, "task_emb_dim": POSITIVE_INT, "chunk_emb_dim": POSITIVE_INT,
              "hidden": WIDTHS, "beta": NON_NEGATIVE, "lookahead_lr": POSITIVE, "emb_std": POSITIVE,
              "lookahead_step": one_of("sgd", "optimizer")}
#: one line per setting, as ``clax list hnet`` prints it
HNET_HELP = {
    "chunk_size": "target-network values generated per hypernetwork call (chunk)",
    "task_emb_dim": "size of each task's embedding",
    "chunk_emb_dim": "size of each chunk's embedding",
    "hidden": "the hypernetwork's hidden layer widths ([]: a linear hypernetwork, the H-embedding authors')",
    "beta": "weight of the output regulariser on old tasks' generated weights",
    "lookahead": "evaluate the regulariser after a one-step lookahead (the paper's)",
    "lookahead_lr": "step size of the lookahead (lookahead_step=sgd)",
    "lookahead_step": "sgd: a plain gradient step of lookahead_lr; optimizer: the trainer's optimizer's step (authors')",
    "emb_std": "initial std of the task and chunk embeddings",
}


def hnet_parts(ctx: Context, s: dict, name: str = "hnet") -> tuple[Model, tuple[Transform, ...], Target]:
    """HNET's model and transforms from checked settings ``s`` (also the base of
    :mod:`clax.methods.hembed`): ``(model, (output_reg,), target)``; ``name`` prefixes bad settings."""
    target = make_target(ctx, s, name)
    if s["lookahead"] and s["lookahead_step"] == "optimizer":
        reg = generated.lookahead_regulariser(target.hn, ctx.num_tasks, s["beta"], setting=name)
    else:
        reg = output_reg.transform(target.hn, ctx.num_tasks, s["beta"], s["lookahead"], s["lookahead_lr"],
                                   setting=name)
    return generated.model(ctx, s, target), (reg,), target


def hnet(ctx: Context, **settings) -> Method:
    """HNET with settings ``chunk_size``, ``task_emb_dim``, ``chunk_emb_dim``, ``hidden`` (the
    hypernetwork's widths; ``[]`` for a linear one), ``beta``, ``lookahead``, ``lookahead_step``
    (``sgd`` | ``optimizer``), ``lookahead_lr`` and ``emb_std`` (initial std of the task and chunk
    embeddings)."""
    model, transforms, _ = hnet_parts(ctx, check_settings("hnet", HNET_DEFAULTS, settings, HNET_RULES))
    return chain(model, *transforms, name="hnet")


def generated_weights(method_cl: CLState, ctx: Context, t: int, settings: dict | None = None) -> dict:
    """Task ``t``'s generated target parameters (host-side helper for tests and inspection)."""
    s = {**HNET_DEFAULTS, **(settings or {})}
    return make_target(ctx, s, "hnet").hn.apply(method_cl.shared["hnet"], method_cl.per_task["emb"][t])
