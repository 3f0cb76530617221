"""``conv_general_dilated`` whose weight gradient reads the stored input, for XLA on the CPU.

:func:`conv_general_dilated` is :func:`jax.lax.conv_general_dilated` with the same values and the same
derivatives, bit for bit. It exists for one compiler behaviour. XLA's CPU convolution wants the weight
gradient's input ``x [N, H, W, C]`` transposed to ``[C, H, W, N]``. Its fusion pass puts that transpose
in one loop with the element-wise ops that produced ``x`` in the forward pass (BatchNorm, residual add,
ReLU, up to three blocks back in a ResNet) and recomputes them there, reading each source with a stride
of a whole image per element, rather than reading the ``x`` the forward pass already stored. In the
reduced ResNet-18 train step on a 2-core CPU those transposes took 85-110 ms of a 270-300 ms step
(``benchmarks/step_vs_torch.py``; BENCHMARKS.md).

Here the weight-gradient term of the JVP, ``conv(x, dw)``, reads ``x`` through :func:`hold`: on the CPU a
``lax.cond`` whose two branches both return ``x`` unchanged (XLA does not fuse across a conditional,
and keeps it because the branches differ in form: one is an ``optimization_barrier``). The transpose
then reads the stored ``x``. The conditional costs one copy of ``x``; on other platforms :func:`hold`
is the identity (``lax.platform_dependent``), since a GPU conditional would sync with the host.

The rule is a ``custom_jvp`` (not a ``custom_vjp``), so forward mode (``jax.jacfwd``, used by SupSup's
one-shot task inference) works, and with symbolic zeros, so a frozen kernel (no tangent) costs nothing.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _held_cpu(x: jax.Array, pred_source: jax.Array) -> jax.Array:
    first = pred_source.reshape(-1)[0]
    # Both branches return x; the predicate is only something XLA cannot fold (False for a NaN entry).
    return lax.cond(first == first, lambda a: a, lax.optimization_barrier, x)


def hold(x: jax.Array, pred_source: jax.Array) -> jax.Array:
    """``x`` unchanged, which XLA on the CPU must materialise before its consumers read it.

    Args:
      x: any array.
      pred_source: a non-empty array computed at run time (its first entry makes the predicate XLA
        cannot constant-fold; its value never changes the result).

    Returns:
      ``x``, bit for bit, on every platform.
    """
    return lax.platform_dependent(x, pred_source, cpu=_held_cpu, default=lambda a, _: a)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv(lhs, rhs, config):
    return lax.conv_general_dilated(lhs, rhs, **dict(config))


def _conv_jvp(config, primals, tangents):
    lhs, rhs = primals
    dlhs, drhs = tangents
    kw = dict(config)
    out = lax.conv_general_dilated(lhs, rhs, **kw)
    terms = []
    if not isinstance(dlhs, SymbolicZero):
        terms.append(lax.conv_general_dilated(dlhs, rhs, **kw))
    if not isinstance(drhs, SymbolicZero):
        terms.append(lax.conv_general_dilated(hold(lhs, rhs), drhs, **kw))
    if not terms:
        return out, jnp.zeros_like(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


_conv.defjvp(_conv_jvp, symbolic_zeros=True)


def _frozen(v):
    if isinstance(v, list):
        return tuple(_frozen(e) for e in v)
    return v


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None) -> jax.Array:
    """:func:`jax.lax.conv_general_dilated`, same signature and results, whose weight gradient reads the
    stored input on the CPU (see the module docstring). Pass it as ``flax.linen.Conv``'s
    ``conv_general_dilated``."""
    if not isinstance(padding, str):
        padding = tuple(tuple(p) for p in padding)
    config = (("window_strides", tuple(window_strides)), ("padding", padding),
              ("lhs_dilation", _frozen(lhs_dilation)), ("rhs_dilation", _frozen(rhs_dilation)),
              ("dimension_numbers", _frozen(dimension_numbers)),
              ("feature_group_count", feature_group_count), ("batch_group_count", batch_group_count),
              ("precision", _frozen(precision)), ("preferred_element_type", preferred_element_type))
    return _conv(lhs, rhs, config)
