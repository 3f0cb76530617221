"""clax: continual learning in JAX. ``clax.chain(model, *transforms)`` builds a method from a model and
continual-learning transforms (:mod:`clax.compose`); :func:`clax.train.fit` runs it on a task stream."""
from clax.compose import Model, Transform, View, chain, join

__all__ = ["Model", "Transform", "View", "chain", "join"]
