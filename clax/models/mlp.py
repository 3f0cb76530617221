"""Multi-layer perceptron backbone: flattened input -> ReLU hidden layers -> features."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """``hidden`` ReLU layers named ``fc0, fc1, ...``; the output is the last hidden activation."""

    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"fc{i}")(x))
        return x
