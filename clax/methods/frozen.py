"""Pieces the frozen-backbone methods (CLR, Soft-TF) share: the frozen backbone's source, the record of
trained tasks, per-sample task dispatch and the checked public ``predict``."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clax.methods.base import Context, Method
from clax.partition import CLState
from clax.pretrain import pretrained_backbone
from clax.settings import NON_NEGATIVE_INT, POSITIVE_INT

#: settings every frozen-backbone method has (see :func:`clax.pretrain.pretrained_backbone`): ``pretrained``
#: is ``"auto"`` (the checkpoint of ``backbone.pretrained=PATH`` frozen as loaded, else glyph pretraining),
#: ``"glyphs"``, ``"none"`` or a ``.msgpack`` path.
PRETRAIN_DEFAULTS = {"pretrained": "auto", "pretrain_steps": 200, "pretrain_seed": 0, "pretrain_dir": ""}
PRETRAIN_RULES = {"pretrain_steps": POSITIVE_INT, "pretrain_seed": NON_NEGATIVE_INT}


def frozen_backbone(ctx: Context, s: dict, method: str):
    """``(params, batch_stats, pretraining report)`` of the frozen backbone described by settings ``s`` of
    method ``method`` (named in errors as ``<method>.pretrained``). A checkpoint given as
    ``backbone.pretrained`` is returned exactly as loaded; its report names the file and its SHA-256."""
    return pretrained_backbone(ctx.backbone, s["pretrained"], int(s["pretrain_steps"]), int(s["pretrain_seed"]),
                               s["pretrain_dir"], setting=f"{method}.pretrained")


def mark_trained(cl: CLState, t: int) -> CLState:
    """``cl`` with task ``t`` recorded as trained in ``extra["trained"]`` (``[T]`` bool)."""
    return cl.replace(extra={**cl.extra, "trained": cl.extra["trained"].at[t].set(True)})


def check_trained(cl: CLState, tid) -> None:
    """Raises ValueError naming a task id in ``tid`` that has not been trained (host-side values only;
    under ``jit`` it does nothing, see :func:`checked_predict`)."""
    trained = cl.extra.get("trained")
    if tid is None or trained is None or isinstance(tid, jax.core.Tracer) or isinstance(trained, jax.core.Tracer):
        return
    done = np.asarray(trained)
    for i in np.unique(np.asarray(tid)).tolist():
        if not 0 <= i < len(done) or not done[i]:
            names = ", ".join(map(str, np.flatnonzero(done).tolist())) or "none yet"
            raise ValueError(f"task id {i} has not been trained (trained task ids: {names})")


def checked_predict(method: Method, cl: CLState, x, tid=None) -> jax.Array:
    """``method.predict`` compiled, after a host-side check that every id in ``tid`` has been trained.

    Raises:
      ValueError: naming an untrained task id.
    """
    check_trained(cl, tid)
    # jax.jit caches compilations per wrapped function, so re-wrapping here does not recompile
    return jax.jit(method.predict)(cl, x, None if tid is None else jnp.asarray(tid, jnp.int32))


def by_task(fn: Callable[[jax.Array], jax.Array], tid, num_tasks: int) -> jax.Array:
    """``fn(t) -> [B, ...]`` evaluated with sample ``b`` under task ``tid[b]``.

    ``tid`` is a scalar (one call) or ``[B]``: where every sample has the same id (the usual case) one
    call runs; otherwise ``fn`` runs for every task and each sample takes its own task's row.
    """
    if jnp.ndim(tid) == 0:
        return fn(tid)

    def mixed():
        outs = jax.lax.map(fn, jnp.arange(num_tasks))  # [T, B, ...]
        return outs[tid, jnp.arange(tid.shape[0])]

    return jax.lax.cond(jnp.all(tid == tid[0]), lambda: fn(tid[0]), mixed)
