"""Fine-tuning (the lower bound) and joint training (the upper bound).

``finetune`` is the plain model and nothing else: :func:`clax.compose.chain` of the classifier
(per-task heads in TIL, one shared head in CIL) with no transform. ``joint`` adds the one transform that
trains task ``r`` on the union of tasks ``0..r`` (cumulative joint training), so its accuracy matrix is
comparable with every other method's.
"""
from __future__ import annotations

from clax.compose import Transform, chain
from clax.methods.base import Context, Method
from clax.transforms import classifier

FINETUNE_DEFAULTS: dict = {}
JOINT_DEFAULTS: dict = {}


def finetune(ctx: Context) -> Method:
    """Plain sequential fine-tuning: the classifier, no transform."""
    return chain(classifier.model(ctx), name="finetune")


def joint(ctx: Context) -> Method:
    """Cumulative joint training on all tasks seen so far."""
    return chain(classifier.model(ctx), Transform("joint", cumulative=True), name="joint")
