"""DualPrompt's prefix prompts and prompt keys (Wang et al. 2022), as Soft-TF's authors use them.

Prefix-tuning: at a chosen ViT block a prompt ``[2, L, dim]`` — a key-prefix and a value-prefix — is
prepended to that block's attention keys and values (not to the queries, not to the token sequence;
:class:`clax.models.vit.Attention`).

* G-prompts (general): one prompt per block of ``g_layers``, shared by all tasks: ``[G, 2, L, dim]``.
* E-prompts (expert): one prompt per task and block of ``e_layers``: ``[T, E, 2, L, dim]``, and one
  learnable key per task ``[T, dim]``. A task's key is pulled towards the query — the frozen model's
  CLS feature — of its training images (:func:`key_loss`); at test time without a task id the task is
  the trained one whose key is most cosine-similar to the query (:func:`match`).

Prompts and keys start uniform in ``[-1, 1]`` (DualPrompt's ``uniform`` initialiser). Where a block is
in both ``g_layers`` and ``e_layers`` its prefix is the G-prompt followed by the E-prompt (length
``Lg + L``; G-prompts may have their own length ``Lg``, as the authors' ImageNet-R config: 5 and 20).
Layer indices may be negative, counting from the last block (:func:`resolve_layers`).

The prompts are parameters of the model (Soft-TF's, :func:`clax.transforms.soft_mask.model`);
:func:`dualprompt` is the transform of their training (the pull constraint, the E-prompt carried to the
next task, G-prompts frozen after the first task) and :func:`rule` the key-matching task inference.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from clax.compose import Transform


def resolve_layers(name: str, layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """``layers`` as block indices in ``0..depth-1`` (negative ones count from the end, as in Python).

    Raises:
      ValueError: naming the setting ``name`` and the depth, for an index outside the blocks or a repeat.
    """
    out = []
    for i in layers:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise ValueError(f"{name}={list(layers)}: layer {i} does not exist in a backbone of depth {depth} "
                             f"(blocks 0..{depth - 1}, or -{depth}..-1 from the end)")
        if j in out:
            raise ValueError(f"{name}={list(layers)}: layer {i} is given twice (depth {depth})")
        out.append(j)
    return tuple(out)


def init(key: jax.Array, num_tasks: int, dim: int, length: int, g_layers: Sequence[int],
         e_layers: Sequence[int], g_length: int = 0) -> dict[str, jax.Array]:
    """Prompts and keys, uniform in ``[-1, 1]``.

    Returns:
      ``{"g": [G, 2, Lg, dim], "e": [T, E, 2, L, dim], "key": [T, dim]}`` with ``G = len(g_layers)``,
      ``E = len(e_layers)``, ``L = length``, ``Lg = g_length or length``, ``T = num_tasks``.
    """
    kg, ke, kk = jax.random.split(key, 3)
    u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0)  # noqa: E731
    return {"g": u(kg, (len(g_layers), 2, int(g_length or length), dim)),
            "e": u(ke, (num_tasks, len(e_layers), 2, length, dim)),
            "key": u(kk, (num_tasks, dim))}


def prefixes(g: jax.Array, e_row: jax.Array, g_layers: Sequence[int],
             e_layers: Sequence[int]) -> dict[int, jax.Array]:
    """The attention prefixes of one task: ``{block: [1, 2, L', dim]}`` for the ViT's ``prompts``.

    Args:
      g: G-prompts ``[G, 2, L, dim]``, in the order of ``g_layers``.
      e_row: one task's E-prompts ``[E, 2, L, dim]`` (or a superposition of several tasks'), in the
        order of ``e_layers``.
      g_layers, e_layers: resolved block indices (:func:`resolve_layers`).

    Returns:
      One prefix per block in either list; ``L' = Lg + L`` where a block has both (G first).
    """
    out: dict[int, jax.Array] = {}
    for prompts, layers in ((g, g_layers), (e_row, e_layers)):
        for i, layer in enumerate(layers):
            p = prompts[i][None]
            out[layer] = jnp.concatenate([out[layer], p], axis=2) if layer in out else p
    return out


def _normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def cosine(query: jax.Array, keys: jax.Array) -> jax.Array:
    """Cosine similarity ``[B, T]`` of queries ``[B, dim]`` and keys ``[T, dim]``."""
    return _normalize(query) @ _normalize(keys).T


def match(query: jax.Array, keys: jax.Array, trained: jax.Array) -> jax.Array:
    """Task ids ``[B]`` (int32): per query ``[B, dim]``, the trained task (``trained [T]`` bool) whose
    key ``[T, dim]`` is most cosine-similar."""
    sim = jnp.where(trained[None], cosine(query, keys), -jnp.inf)
    return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def key_loss(query: jax.Array, key_t: jax.Array) -> jax.Array:
    """DualPrompt's pull constraint as a loss: the mean over the batch of ``1 - cos(query_b, key_t)``
    for queries ``[B, dim]`` and one task's key ``[dim]`` (a scalar)."""
    return jnp.mean(1.0 - cosine(query, key_t[None])[:, 0])


def check_settings(s: dict, method: str = "soft_tf") -> None:
    """Raises ValueError naming a bad prompt setting of ``method`` (those that need no backbone)."""
    if s["task_inference"] == "prompt" and not s["prompts"]:
        raise ValueError(f"{method}.task_inference='prompt' (key matching) needs {method}.prompts=true")
    if not s["prompts"]:
        return
    if int(s["prompt_length"]) < 1:
        raise ValueError(f"{method}.prompt_length must be >= 1, got {s['prompt_length']}")
    if int(s.get("g_prompt_length", 0)) < 0:
        raise ValueError(f"{method}.g_prompt_length must be >= 0 (0: prompt_length), got {s['g_prompt_length']}")
    if not s["e_prompt_layers"]:
        raise ValueError(f"{method}.e_prompt_layers must name at least one block (the E-prompts carry the task keys)")
    if s["g_prompt_tasks"] not in ("first", "all"):
        raise ValueError(f"{method}.g_prompt_tasks must be one of first, all, got {s['g_prompt_tasks']!r}")
    if not float(s["key_loss_weight"]) >= 0.0:
        raise ValueError(f"{method}.key_loss_weight must be >= 0, got {s['key_loss_weight']}")


def layers(s: dict, depth: int, method: str = "soft_tf") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(g_layers, e_layers)`` of settings ``s`` resolved for a ViT of ``depth`` blocks.

    Raises:
      ValueError: no ViT blocks, or a layer outside them or repeated (naming the setting).
    """
    if depth == 0:
        raise ValueError(f"{method}.prompts needs a ViT backbone (parameters blocks_0, blocks_1, ...)")
    return (resolve_layers(f"{method}.g_prompt_layers", s["g_prompt_layers"], depth),
            resolve_layers(f"{method}.e_prompt_layers", s["e_prompt_layers"], depth))


def rule(query, trained: str = "trained"):
    """DualPrompt's key matching as a task-inference rule ``(cl, x) -> [B]``: per sample, the trained task
    (``cl.extra[trained]``) whose key ``per_task["e_key"]`` is most cosine-similar to ``query(cl, x)``."""
    return lambda cl, x: match(query(cl, x), cl.per_task["e_key"], cl.extra[trained])


def dualprompt(query, key_loss_weight: float, g_layers, e_layers, length: int, g_prompt_tasks: str = "first",
               name: str = "prompts") -> Transform:
    """The training of DualPrompt's prompts (held by the model: ``shared["g_prompt"]``,
    ``per_task["e_prompt"]``, ``per_task["e_key"]``).

    * term ``key_loss``: :func:`key_loss` of the current batch's queries ``query(cl, x)`` (the frozen
      backbone's CLS feature) and task ``t``'s key, added with weight ``key_loss_weight``;
    * ``begin_task``: task ``t``'s E-prompt starts as a copy of task ``t - 1``'s (its key does not);
    * with ``g_prompt_tasks="first"`` and G-prompts, ``shared`` is updated in the first task only;
    * reports ``prompts``: the length, the resolved layers and ``g_prompt_tasks``.
    """
    def loss(cl, view, batch, key, t):
        pull = key_loss(query(cl, batch["x"]), cl.per_task["e_key"][t])
        return key_loss_weight * pull, {"key_loss": pull}

    def begin_task(cl, data):
        if data.t == 0:
            return cl
        e = cl.per_task["e_prompt"]  # the new task's E-prompt starts from the previous task's
        return cl.replace(per_task={**cl.per_task, "e_prompt": e.at[data.t].set(e[data.t - 1])})

    def update_mask(cl, t):
        """``shared`` (the G-prompts) moves in the first task only; every per-task row moves freely."""
        return {"shared": jax.tree.map(lambda a: jnp.broadcast_to(t == 0, a.shape), cl.shared),
                "task": jax.tree.map(lambda a: jnp.ones(a.shape[1:], bool), cl.per_task)}

    report = {"prompts": {"length": int(length), "g_layers": list(g_layers), "e_layers": list(e_layers),
                          "g_prompt_tasks": g_prompt_tasks}}
    return Transform(name, loss=loss, begin_task=begin_task, report=lambda cl: report,
                     update_mask=update_mask if g_layers and g_prompt_tasks == "first" else None)
