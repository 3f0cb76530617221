"""Rehearsal: a reservoir memory of past samples mixed into every batch (experience replay, DER++).

The memory (``buffer_size`` rows of ``x``, ``y``, ``tid`` and, for DER++, the model's ``logits``) is
filled at the end of each task by reservoir sampling over the stream, host-side, so every sample seen
so far is equally likely to be kept (Chaudhry et al. 2019). Each step draws rows from it with the
step's key; the transform scores its rows itself, over the model's whole output space, as its own
named loss term (see :mod:`clax.compose`: the chain's ``ce`` covers the current task's rows only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clax.compose import Transform, state, with_state
from clax.methods.base import TaskData


def reservoir_update(buffer: dict, rows: dict, rng) -> dict:
    """Streams ``rows`` (arrays with a leading sample axis, the buffer's fields) through reservoir
    sampling into ``buffer`` (host-side NumPy); ``buffer["seen"]`` counts the samples seen so far."""
    out = {k: np.array(v) for k, v in buffer.items() if k != "seen"}
    seen = int(buffer["seen"])
    size = out["x"].shape[0]
    for i in range(len(rows["y"])):
        j = seen if seen < size else rng.integers(0, seen + 1)
        if j < size:
            for k in out:
                out[k][j] = rows[k][i]
        seen += 1
    return {**{k: jnp.asarray(v) for k, v in out.items()}, "seen": jnp.asarray(seen, jnp.int32)}


def empty_buffer(size: int, input_shape, num_logits: int = 0) -> dict:
    """An empty memory of ``size`` rows (with a ``logits [size, num_logits]`` field when positive)."""
    buf = {"x": jnp.zeros((size,) + tuple(input_shape)), "y": jnp.zeros((size,), jnp.int32),
           "tid": jnp.zeros((size,), jnp.int32), "seen": jnp.asarray(0, jnp.int32)}
    return {**buf, "logits": jnp.zeros((size, num_logits))} if num_logits else buf


def draw(buf: dict, key, n: int) -> dict:
    """``n`` rows drawn uniformly (with replacement) from the filled part of ``buf``."""
    filled = jnp.minimum(buf["seen"], buf["x"].shape[0])
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(filled, 1))
    return {k: v[idx] for k, v in buf.items() if k != "seen"}


def host_rng(key) -> np.random.Generator:
    """The host-side generator of a task's reservoir pass, seeded from the task's key."""
    return np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))


def replay(size: int, input_shape, weight: float = 1.0, name: str = "replay") -> Transform:
    """Experience replay: each batch gets as many rows drawn from a ``size``-row reservoir memory;
    term ``name`` (default ``replay``) is their mean cross-entropy (0 while the memory is empty), added
    with ``weight``."""

    def batch(cl, b, key, t):
        return draw(state(cl, name), key, b["x"].shape[0])

    def loss(cl, view, b, key, t):
        logits, _, rows = view.part(name)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows["y"]).mean()
        term = jnp.where(state(cl, name)["seen"] > 0, ce, 0.0)  # 0 (and logged as 0) while the memory is empty
        return (term if weight == 1.0 else weight * term), {name: term}

    def end_task(cl, data: TaskData):
        rows = {"x": data.x, "y": data.y, "tid": np.full(len(data.y), data.t)}
        return with_state(cl, name, reservoir_update(state(cl, name), rows, host_rng(data.key)))

    return Transform(name, init=lambda key, cl: empty_buffer(size, input_shape), batch=batch, loss=loss,
                     end_task=end_task, mixes_tasks=True)


def task_logits(model, cl, x, t: int, batch_size: int) -> np.ndarray:
    """The model's test-time logits of task ``t``'s samples ``x`` (TIL: under task ``t``'s head),
    computed in fixed-size chunks (one compilation)."""
    predict = jax.jit(model.predict)
    out = []
    for i in range(0, len(x), batch_size):
        idx = np.resize(np.arange(i, min(i + batch_size, len(x))), batch_size)
        out.append(np.asarray(predict(cl, x[idx], jnp.full((batch_size,), t, jnp.int32)))[: min(batch_size, len(x) - i)])
    return np.concatenate(out)


def derpp(size: int, input_shape, num_outputs: int, alpha: float = 0.2, beta: float = 1.0,
          name: str = "derpp") -> Transform:
    """DER++ (Buzzega et al., NeurIPS 2020): rehearsal that also keeps the model's logits.

    The reservoir memory stores ``x, y, tid`` and the logits the model gave each sample; each step
    draws two independent batches from it: term ``der``, the mean squared error between the current
    logits and the stored ones on the first (weight ``alpha``), and term ``der_ce``, the cross-entropy
    on the second (weight ``beta``). The paper stores the logits of the training forward pass when a
    sample enters the memory; clax fills the memory at the end of each task (like ``replay``), so the
    stored logits are the model's test-time logits at the end of the sample's task. In TIL the logits
    are those of the sample's task head (outputs beyond its classes are -1e9 in both, contributing 0).
    """

    def batch(cl, b, key, t):
        k1, k2 = jax.random.split(key)
        n = b["x"].shape[0]
        first, second = draw(state(cl, name), k1, n), draw(state(cl, name), k2, n)
        return {k: jnp.concatenate([first[k], second[k]]) for k in first}

    def loss(cl, view, b, key, t):
        logits, _, rows = view.part(name)
        n = logits.shape[0] // 2
        valid = rows["logits"][:n] > -1e8
        mse = jnp.mean(jnp.sum(jnp.where(valid, (logits[:n] - rows["logits"][:n]) ** 2, 0.0), -1) / num_outputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[n:], rows["y"][n:]).mean()
        on = state(cl, name)["seen"] > 0
        mse, ce = jnp.where(on, mse, 0.0), jnp.where(on, ce, 0.0)  # 0 (and logged as 0) while the memory is empty
        return alpha * mse + beta * ce, {"der": mse, "der_ce": ce}

    def end_task(cl, data):
        logits = task_logits(data.model, cl, data.x, data.t, data.batch_size)
        rows = {"x": data.x, "y": data.y, "tid": np.full(len(data.y), data.t), "logits": logits}
        return with_state(cl, name, reservoir_update(state(cl, name), rows, host_rng(data.key)))

    return Transform(name, init=lambda key, cl: empty_buffer(size, input_shape, num_outputs), batch=batch,
                     loss=loss, end_task=end_task, mixes_tasks=True)
