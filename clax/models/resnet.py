"""ResNets with explicit BatchNorm state.

* :class:`ResNet18`: four stages of two basic blocks (widths nf, 2nf, 4nf, 8nf). ``stem="cifar"`` is
  the 3x3 stride-1 stem without max-pool used by the continual-learning literature (nf=20 is the
  "reduced" ResNet-18 of GEM/DER/PAH, nf=64 the full one); ``stem="imagenet"`` is torchvision's
  7x7 stride-2 stem with max-pool, for imported ImageNet weights; ``stem="imagenet-nomaxpool"`` is the
  7x7 stride-2 stem without the max-pool (the input is halved once, not twice): IBM's TinyImageNet and
  MiniImageNet ResNet-18 (zackschen/IBM-Net, ``backbone/ResNet18_IB.py``: ``conv7x7`` with stride 2,
  padding 3, then BatchNorm and ReLU, no pooling). :data:`STEMS` lists them.
* :class:`ResNet32`: the CIFAR ResNet-32 of He et al. (three stages of five basic blocks, widths
  16/32/64), the target network of the hypernetwork papers.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1_0/conv1``, ``layer1_0/downsample_conv``)
so that imported state dicts map one-to-one.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from clax.models.conv import conv_general_dilated


#: the valid ``stem`` values of :class:`ResNet18`
STEMS = ("cifar", "imagenet", "imagenet-nomaxpool")


def _conv(features: int, size: int, stride: int, name: str, padding="SAME"):
    # clax.models.conv's convolution: lax's, bit for bit, with a faster weight gradient on the CPU.
    return nn.Conv(features, (size, size), stride, padding=padding, use_bias=False,
                   conv_general_dilated=conv_general_dilated, name=name)


def _bn(train: bool, name: str):
    # momentum 0.9 here is PyTorch's momentum 0.1.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1 conv + BN) shortcut where the shape changes."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        y = _conv(self.features, 3, self.stride, "conv1", padding=1)(x)
        y = nn.relu(_bn(train, "bn1")(y))
        y = _conv(self.features, 3, 1, "conv2", padding=1)(y)
        y = _bn(train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, "downsample_conv")(x)
            x = _bn(train, "downsample_bn")(x)
        return nn.relu(x + y)


class _ResNet(nn.Module):
    widths: Sequence[int]
    blocks: Sequence[int]
    stem: str = "cifar"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stem == "cifar":
            x = _conv(self.widths[0], 3, 1, "conv1", padding=1)(x)
            x = nn.relu(_bn(train, "bn1")(x))
        elif self.stem in ("imagenet", "imagenet-nomaxpool"):
            x = _conv(self.widths[0], 7, 2, "conv1", padding=3)(x)
            x = nn.relu(_bn(train, "bn1")(x))
            if self.stem == "imagenet":
                x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        for i, (w, n) in enumerate(zip(self.widths, self.blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(w, stride, name=f"layer{i + 1}_{j}")(x, train)
        return jnp.mean(x, axis=(1, 2))


class ResNet18(nn.Module):
    """ResNet-18; features are the global-average-pooled last stage (8 * nf wide)."""

    nf: int = 20
    stem: str = "cifar"

    @nn.compact
    def __call__(self, x, train: bool = False):
        nf = self.nf
        return _ResNet((nf, 2 * nf, 4 * nf, 8 * nf), (2, 2, 2, 2), self.stem, name="resnet")(x, train)


class ResNet32(nn.Module):
    """CIFAR ResNet-32 (3 stages x 5 blocks); features are 4 * nf wide (64 for nf=16)."""

    nf: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        nf = self.nf
        return _ResNet((nf, 2 * nf, 4 * nf), (5, 5, 5), "cifar", name="resnet")(x, train)
