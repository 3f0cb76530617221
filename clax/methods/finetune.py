"""Fine-tuning (the lower bound) and joint training (the upper bound).

``finetune`` trains the backbone and the head on each task in turn with nothing to protect old
tasks: per-task heads in TIL, one shared head in CIL. ``joint`` is the same model trained at task
``r`` on the union of tasks ``0..r`` (cumulative joint training), so its accuracy matrix is
comparable with every other method's.
"""
from __future__ import annotations

from clax.methods.base import Context, Method
from clax.transforms import classifier

FINETUNE_DEFAULTS: dict = {}
JOINT_DEFAULTS: dict = {}


def classifier_method(name: str, ctx: Context, **overrides) -> Method:
    """The plain backbone + head method; ``overrides`` replace any of its fields."""

    def init(key):
        return classifier.init(key, ctx)

    def loss(cl, batch, key, t):
        logits, state = classifier.apply(cl, ctx, batch["x"], batch["tid"], train=True)
        ce = classifier.cross_entropy(logits, batch["y"])
        return ce, (state, {"loss": ce, "ce": ce})

    def predict(cl, x, tid):
        return classifier.apply(cl, ctx, x, tid, train=False)[0]

    return Method(name, init, loss, predict)._replace(**overrides)


def finetune(ctx: Context) -> Method:
    """Plain sequential fine-tuning."""
    return classifier_method("finetune", ctx)


def joint(ctx: Context) -> Method:
    """Cumulative joint training on all tasks seen so far."""
    return classifier_method("joint", ctx, cumulative=True)
