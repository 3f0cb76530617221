"""A per-partition learning rate as a transform: no hook, only ``lr_scales``.

The trainer chains :func:`clax.train.lr_scale_transform` after its optimizer (or a user's), so the
selected leaves' updates, i.e. their learning rate and any decoupled weight decay, are ``scale`` times
the others'; the state and the checkpoint hold the real weights. ``train.lr_scales`` in the config can
override it (later rules win).
"""
from __future__ import annotations

from clax.compose import Transform


def lr_scale(pattern: str, scale: float, name: str = "lr_scale") -> Transform:
    """The leaves of the trained tree whose path matches ``pattern`` (e.g. ``"shared/backbone"``, a
    regex over :func:`clax.train.tree_paths`) learn at ``scale`` times the trainer's rate."""
    return Transform(name, lr_scales=((pattern, float(scale)),))
