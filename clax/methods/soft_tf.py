"""Soft-TF: Soft-Transformers for continual learning (Kang & Yoo, arXiv 2411.16073).

A pretrained ViT is frozen, all of it. In the chosen blocks (setting ``masked_blocks``: the last
``n``, default 3, as the paper text and the authors' README say; or ``masked_layers``: a list of block
indices, negative ones from the last, e.g. ``[11]`` and ``[5]`` of the authors' runnable CIFAR-100 and
ImageNet-R configs; or any regex ``mask_filter`` over parameter paths) the attention ``qkv`` and ``proj``
and the MLP ``fc1`` and ``fc2`` weights get a per-task real-valued mask of their full shape, initialised
uniform in [0.99, 1.0]: task ``t`` runs with ``W_t = M_t * W`` (:mod:`clax.transforms.soft_mask`).
With ``binary=True`` task ``t`` instead learns scores and keeps the top ``keep`` fraction of each
weight with a straight-through gradient (:mod:`clax.transforms.binary_mask`, as in WSN); scores start at
``|W| * U(0.99, 1)`` so the first kept set is the largest weights. Each task has its own linear head
(other tasks' outputs masked); the loss is cross-entropy with ``label_smoothing`` over the task's
classes (default 0.1; the authors' code never passes its ``--smoothing`` flag to the loss: plain
cross-entropy, ``label_smoothing=0``).

DualPrompt prompts (opt-in, ``prompts=True``; the authors' combination, :mod:`clax.transforms.prompt`):
prefix-tuning prompts of ``prompt_length`` tokens (G-prompts ``g_prompt_length``, 0: the same; key-
and value-prefixes prepended to attention keys and values). G-prompts at blocks ``g_prompt_layers`` are
shared by all tasks (partition ``shared``);
E-prompts at blocks ``e_prompt_layers`` and one key per task are per-task rows (``per_task``). Negative
layer indices count from the last block, so the default ``[-3, -2, -1]`` is blocks 9-11 of ViT-B/16,
the masked blocks. The loss adds ``key_loss_weight * (1 - cos(q, key_t))`` (DualPrompt's pull
constraint, coefficient 1.0), ``q`` the frozen backbone's CLS feature (no masks, no prompts). A new
task's E-prompt starts as a copy of the previous task's (the authors' ``shared_prompt_pool``); its key
does not. The authors train the G-prompts in every task (their Table-1 script passes ``--no_pgp``, so
without gradient projection), which forgets; clax by default trains them in the first task only
(``g_prompt_tasks="first"``: the update of ``shared`` is masked out afterwards), so zero forgetting
still holds exactly; ``g_prompt_tasks="all"`` is the authors' schedule.

Zero forgetting: only row ``t`` of the masks and heads is trained in task ``t``; at the end of the task
the row is replaced by what is stored (the soft mask rounded to ``mask_precision``, or the hard binary
mask), so evaluation always uses the stored model. Stored bytes per task (``Method.task_bytes``): soft
masks at ``mask_precision``, binary masks bit-packed, plus the head.

CIL: the task id is inferred per sample, by ``task_inference``:
  * ``"entropy"``: the one-shot rule of SupSup — superimpose the trained tasks' masks and heads with
    weights ``alpha = 1/T_seen``, and pick the task with the largest ``-d(entropy)/d(alpha_t)``
    (one forward-mode derivative per task);
  * ``"ncm"``: nearest class mean of the frozen (unmasked) backbone's L2-normalised CLS features,
    means taken over each task's training data at its end;
  * ``"prompt"`` (needs ``prompts=True``): DualPrompt's key matching, the trained task whose E-key is
    most cosine-similar to the frozen CLS feature (per sample).
``batch_vote=N`` (opt-in, default 0 = per sample) replaces the rule's ids in each group of ``N``
consecutive test rows by their majority (:func:`clax.transforms.task_inference.majority`), as the
authors' CIL figures do (``batchwise_prompt``, 24 images of one task per test batch). It uses the test
batch's composition, so it is not a per-sample CIL protocol: results.json then reports both figures.
With prompts, ``"entropy"`` superimposes the E-prompts with the same weights ``alpha`` as the masks.
results.json reports the task-id accuracy and the class accuracy of every available rule
(``task_inference``).

The frozen ViT: a checkpoint given as ``backbone.pretrained=PATH`` is frozen exactly as loaded; without
one, setting ``pretrained`` (``"auto"``, the default, and ``"glyphs"``: offline pretraining on synthetic
glyphs, :mod:`clax.pretrain`; ``"none"``: the random initialisation; a ``.msgpack`` path) with
``pretrain_steps``, ``pretrain_seed``, ``pretrain_dir``. ``pretrained="glyphs"`` together with a
checkpoint is refused. results.json's ``pretrain`` names the source (a file with its SHA-256).

The method is a chain (:func:`clax.compose.chain`) of the model :func:`clax.transforms.soft_mask.model`
(the frozen ViT, per-task masks and heads, the prompts' parameters, label-smoothed ``ce``) and the
transforms ``stored_masks`` (:func:`clax.transforms.soft_mask.stored`), ``prompts``
(:func:`clax.transforms.prompt.dualprompt`, with ``prompts=True``), ``task_inference`` (CIL,
:mod:`clax.transforms.task_inference`), ``trained`` and ``pretrained`` (:mod:`clax.transforms.frozen`).
Joined with rehearsal (``soft_tf+replay``, CIL) the stored rows of old tasks score their own samples
(no gradient: those rows are frozen; with ``g_prompt_tasks="all"`` the G-prompts learn from the current
task's rows only).
"""
from __future__ import annotations

import jax

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.methods.frozen import PRETRAIN_DEFAULTS, PRETRAIN_HELP, PRETRAIN_RULES, frozen_backbone
from clax.settings import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, REGEX, between, check_settings,
                           one_of)
from clax.transforms import binary_mask, frozen, prompt, soft_mask, task_inference
from clax.transforms.soft_mask import block_filter, layer_filter, vit_depth  # noqa: F401 (re-exported)

SOFT_TF_DEFAULTS = {"masked_blocks": 3, "masked_layers": [], "mask_filter": "", "binary": False, "keep": 0.9,
                    "mask_precision": "int8", "label_smoothing": 0.1, "task_inference": "ncm", "batch_vote": 0,
                    "prompts": False, "prompt_length": 5, "g_prompt_length": 0, "g_prompt_layers": [0, 1],
                    "e_prompt_layers": [-3, -2, -1],
                    "g_prompt_tasks": "first", "key_loss_weight": 1.0,
                    **{**PRETRAIN_DEFAULTS, "pretrain_steps": 300}}
INFERENCE_RULES = ("ncm", "entropy", "prompt")  # "prompt" only with prompts=True
G_PROMPT_TASKS = ("first", "all")
SOFT_TF_RULES = {"masked_blocks": POSITIVE_INT, "mask_filter": REGEX, "keep": FRACTION,
                 "mask_precision": one_of(*soft_mask.PRECISIONS), "label_smoothing": between(0, 1, "[)"),
                 "task_inference": one_of(*INFERENCE_RULES), "batch_vote": NON_NEGATIVE_INT,
                 "g_prompt_length": NON_NEGATIVE_INT,
                 "g_prompt_tasks": one_of(*G_PROMPT_TASKS),
                 "key_loss_weight": NON_NEGATIVE, **PRETRAIN_RULES}
#: one line per setting, as ``clax list soft_tf`` prints it
SOFT_TF_HELP = {
    "masked_blocks": "mask the weights of the last this many ViT blocks",
    "masked_layers": "mask these ViT blocks instead (negative: from the last; authors' code: [11] CIFAR, [5] IMR)",
    "mask_filter": "regular expression over parameter paths choosing the masked weights (overrides masked_blocks)",
    "binary": "binary top-keep masks with a straight-through gradient instead of soft masks",
    "keep": "fraction of each weight tensor a binary mask keeps",
    "mask_precision": "precision soft masks are stored in",
    "label_smoothing": "label smoothing of the cross-entropy",
    "task_inference": "CIL task-id rule: ncm, entropy, or prompt (needs prompts=true)",
    "batch_vote": "CIL: 0 per-sample task id; N majority over N consecutive test rows (authors' figures: 24)",
    "prompts": "add DualPrompt prefix prompts (G-prompts shared, E-prompts and keys per task)",
    "prompt_length": "tokens per prompt",
    "g_prompt_length": "tokens per G-prompt (0: prompt_length; the authors' ImageNet-R config: 5, E-prompts 20)",
    "g_prompt_layers": "blocks with the shared G-prompts",
    "e_prompt_layers": "blocks with the per-task E-prompts (negative: from the last)",
    "g_prompt_tasks": "train the G-prompts in the first task only, or in all tasks (authors')",
    "key_loss_weight": "weight of DualPrompt's key pull constraint",
    **PRETRAIN_HELP,
}


def inference_rules(s: dict) -> tuple[str, ...]:
    """The task-id inference rules available under settings ``s``."""
    return tuple(r for r in INFERENCE_RULES if r != "prompt" or s["prompts"])


def soft_tf(ctx: Context, **settings) -> Method:
    """Soft-TF with the settings of :data:`SOFT_TF_DEFAULTS` (see the module docstring)."""
    s = check_settings("soft_tf", SOFT_TF_DEFAULTS, settings, SOFT_TF_RULES)
    prompt.check_settings(s, "soft_tf")
    binary, cil = bool(s["binary"]), ctx.scenario == "cil"
    keep = binary_mask.check_fraction("soft_tf.keep", s["keep"]) if binary else None
    # Settings that depend on the backbone's parameters are checked on their shapes, before any pretraining.
    shapes = jax.eval_shape(ctx.backbone.init, jax.random.PRNGKey(0))[0]
    if s["mask_filter"]:
        filt = s["mask_filter"]
    elif s["masked_layers"]:
        filt = layer_filter(shapes, s["masked_layers"], "soft_tf.masked_layers")
    else:
        filt = block_filter(shapes, int(s["masked_blocks"]))
    soft_mask.select(shapes, filt)  # a filter that matches nothing is refused here, naming it
    layers = prompt.layers(s, vit_depth(shapes)) + (int(s["prompt_length"]), int(s["g_prompt_length"])) \
        if s["prompts"] else None
    params, stats, pre_report = frozen_backbone(ctx, s, "soft_tf")
    model, superposed = soft_mask.model(ctx, params, stats, filt, binary, keep, float(s["label_smoothing"]),
                                        layers, name="soft_tf")
    query, parts = frozen.features(ctx), []
    if layers:
        parts.append(prompt.dualprompt(query, float(s["key_loss_weight"]), *layers[:3], s["g_prompt_tasks"]))
    if cil:
        rules = {"entropy": task_inference.entropy(superposed, ctx.output_mask())}
        if s["prompts"]:
            rules["prompt"] = prompt.rule(query)
        parts.append(task_inference.task_inference(ctx, query, model.predict, s["task_inference"], rules,
                                                   vote=int(s["batch_vote"])))
    stored = soft_mask.stored(s["mask_precision"], binary, keep)
    return chain(model, stored, *parts, frozen.trained(ctx.num_tasks), frozen.pretrained(pre_report), name="soft_tf")
