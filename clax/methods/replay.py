"""Experience replay with a reservoir buffer (Chaudhry et al. 2019, "tiny episodic memories").

A fixed-size memory holds ``buffer_size`` past samples (inputs, targets, task ids), filled by
reservoir sampling over the stream, so every sample seen so far is equally likely to be kept. Each
training batch is concatenated with an equally large batch drawn from the memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clax.methods.base import Context, Method, TaskData
from clax.methods.finetune import classifier_method
from clax.settings import POSITIVE_INT, check_settings
from clax.transforms import classifier

REPLAY_DEFAULTS = {"buffer_size": 200}
REPLAY_RULES = {"buffer_size": POSITIVE_INT}


def reservoir_update(buffer: dict, x: np.ndarray, y: np.ndarray, tid: np.ndarray, rng) -> dict:
    """Streams ``(x, y, tid)`` through reservoir sampling into ``buffer`` (host-side NumPy)."""
    bx, by, bt = (np.array(buffer[k]) for k in ("x", "y", "tid"))
    seen = int(buffer["seen"])
    size = bx.shape[0]
    for i in range(x.shape[0]):
        j = seen if seen < size else rng.integers(0, seen + 1)
        if j < size:
            bx[j], by[j], bt[j] = x[i], y[i], tid[i]
        seen += 1
    return {"x": jnp.asarray(bx), "y": jnp.asarray(by), "tid": jnp.asarray(bt),
            "seen": jnp.asarray(seen, jnp.int32)}


def replay(ctx: Context, **settings) -> Method:
    """Experience replay with setting ``buffer_size`` (number of stored samples)."""
    s = check_settings("replay", REPLAY_DEFAULTS, settings, REPLAY_RULES)
    size = int(s["buffer_size"])
    base = classifier_method("replay", ctx)

    def init(key):
        cl = base.init(key)
        buf = {"x": jnp.zeros((size,) + tuple(ctx.input_shape)), "y": jnp.zeros((size,), jnp.int32),
               "tid": jnp.zeros((size,), jnp.int32), "seen": jnp.asarray(0, jnp.int32)}
        return cl.replace(extra={"buffer": buf})

    def loss(cl, batch, key, t):
        buf = cl.extra["buffer"]
        n = jnp.minimum(buf["seen"], size)
        b = batch["x"].shape[0]
        idx = jax.random.randint(key, (b,), 0, jnp.maximum(n, 1))
        x = jnp.concatenate([batch["x"], buf["x"][idx]])
        tid = jnp.concatenate([batch["tid"], buf["tid"][idx]])
        logits, state = classifier.apply(cl, ctx, x, tid, train=True)
        ce_all = jax.nn.log_softmax(logits)
        y = jnp.concatenate([batch["y"], buf["y"][idx]])
        nll = -jnp.take_along_axis(ce_all, y[:, None], axis=1)[:, 0]
        ce_new, ce_mem = nll[:b].mean(), nll[b:].mean()
        total = ce_new + jnp.where(n > 0, ce_mem, 0.0)
        return total, (state, {"loss": total, "ce": ce_new, "replay": ce_mem})

    def end_task(cl, data: TaskData):
        rng = np.random.default_rng(int(jax.random.randint(data.key, (), 0, 2**31 - 1)))
        buf = reservoir_update(cl.extra["buffer"], data.x, data.y, np.full(len(data.y), data.t), rng)
        return cl.replace(extra={"buffer": buf})

    return base._replace(init=init, loss=loss, end_task=end_task)
