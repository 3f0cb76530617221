"""Vision Transformer (pre-norm, CLS token), named after timm so that checkpoints map one-to-one.

Blocks are ``blocks_{i}`` with ``norm1``, ``attn/qkv`` (one fused Dense), ``attn/proj``, ``norm2``,
``mlp/fc1`` and ``mlp/fc2``: the four projections that Soft-TF masks. ViT-B/16 is
``ViT(patch=16, dim=768, depth=12, heads=12)``; tests use tiny shapes.

Prefix-tuning (DualPrompt's prompts, :mod:`clax.transforms.prompt`): ``ViT(x, prompts={i: prefix})``
prepends ``prefix [B or 1, 2, L, dim]`` (key-prefix, then value-prefix) to the keys and values of block
``i``'s attention; queries and the token sequence are unchanged. Without ``prompts`` the computation
is exactly the prompt-free one.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp



def scaled_normal(stddev: float):
    """``nn.initializers.normal(stddev)`` with the same values compiled or eager: the draw, then the
    scaling. Compiled as one program, XLA folds ``stddev`` into the draw's own constant factor (a
    different rounding: 30 of 128 ``pos_embed`` values moved by 4e-9), so the ViT's jitted init
    differed from its eager one; an optimisation barrier keeps the two multiplications apart."""
    def init(key, shape, dtype=jnp.float32):
        return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * jnp.asarray(stddev, dtype)
    return init

class Attention(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x, prefix=None):
        """Self-attention of ``x [B, N, dim]``; ``prefix [B or 1, 2, L, dim]`` (keys, values) is split
        into heads like ``k`` and ``v`` and prepended to them, so each query attends over ``L + N``."""
        b, n, d = x.shape
        hd = d // self.heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if prefix is not None:
            if prefix.ndim != 4 or prefix.shape[1] != 2 or prefix.shape[3] != d or prefix.shape[0] not in (1, b):
                raise ValueError(f"attention prefix must be [{b} or 1, 2, length, {d}], got {prefix.shape}")
            pre = jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]).astype(k.dtype)
            pre = pre.reshape(b, 2, prefix.shape[2], self.heads, hd)
            k = jnp.concatenate([pre[:, 0], k], axis=1)
            v = jnp.concatenate([pre[:, 1], v], axis=1)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
        att = nn.softmax(att, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
        return nn.Dense(d, name="proj")(out)


def quick_gelu(x):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * nn.sigmoid(1.702 * x)


class Mlp(nn.Module):
    hidden: int
    dim: int
    act: str = "gelu"

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, name="fc1")(x)
        h = quick_gelu(h) if self.act == "quick_gelu" else nn.gelu(h, approximate=False)
        return nn.Dense(self.dim, name="fc2")(h)


class Block(nn.Module):
    dim: int
    heads: int
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, prefix=None):
        x = x + Attention(self.dim, self.heads, name="attn")(nn.LayerNorm(self.eps, name="norm1")(x), prefix)
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.act, name="mlp")
        return x + mlp(nn.LayerNorm(self.eps, name="norm2")(x))


class ViT(nn.Module):
    """ViT returning the final-norm CLS feature ``[B, dim]``.

    The defaults are timm's (LayerNorm eps 1e-6, exact GELU). CLIP's image tower is
    ``eps=1e-5, act="quick_gelu", ln_pre=True, patch_bias=False`` (set by the CLIP importer).
    """

    patch: int = 4
    dim: int = 64
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    act: str = "gelu"
    ln_pre: bool = False
    patch_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False, prompts=None):
        """CLS feature ``[B, dim]`` of images ``x [B, H, W, C]``; ``prompts``: optional
        ``{block index: prefix [B or 1, 2, L, dim]}`` for prefix-tuning (see the module docstring)."""
        if self.dim % self.heads:
            raise ValueError(f"vit: dim={self.dim} is not divisible by heads={self.heads}")
        b, h, w, _ = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"vit: image {h}x{w} is not divisible into {self.patch}x{self.patch} patches")
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, padding="VALID", use_bias=self.patch_bias,
                    name="patch_embed")(x)
        x = x.reshape(b, -1, self.dim)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
        pos = self.param("pos_embed", scaled_normal(0.02), (1, x.shape[1], self.dim))
        x = x + pos
        if self.ln_pre:
            x = nn.LayerNorm(self.eps, name="norm_pre")(x)
        prompts = prompts or {}
        bad = sorted(set(prompts) - set(range(self.depth)))
        if bad:
            raise ValueError(f"vit: prompts for block {bad[0]}, but the ViT has blocks 0..{self.depth - 1}")
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp_ratio, self.eps, self.act, name=f"blocks_{i}")(x, prompts.get(i))
        return nn.LayerNorm(self.eps, name="norm")(x)[:, 0]
