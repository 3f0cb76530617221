"""Vision Transformer (pre-norm, CLS token), named after timm so that checkpoints map one-to-one.

Blocks are ``blocks_{i}`` with ``norm1``, ``attn/qkv`` (one fused Dense), ``attn/proj``, ``norm2``,
``mlp/fc1`` and ``mlp/fc2``: the four projections that Soft-TF masks. ViT-B/16 is
``ViT(patch=16, dim=768, depth=12, heads=12)``; tests use tiny shapes.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Attention(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
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
    def __call__(self, x):
        x = x + Attention(self.dim, self.heads, name="attn")(nn.LayerNorm(self.eps, name="norm1")(x))
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
    def __call__(self, x, train: bool = False):
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
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        x = x + pos
        if self.ln_pre:
            x = nn.LayerNorm(self.eps, name="norm_pre")(x)
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp_ratio, self.eps, self.act, name=f"blocks_{i}")(x)
        return nn.LayerNorm(self.eps, name="norm")(x)[:, 0]
