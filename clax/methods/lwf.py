"""Learning without Forgetting (Li & Hoiem, TPAMI 2017): the classifier and
:func:`clax.transforms.distill.lwf`.

At the start of each task the model is snapshotted as the teacher; while the task trains, the
student's outputs for old tasks on the new data are distilled towards the teacher's
(``alpha * KL`` at temperature ``T``, the paper's loss without Hinton's ``T^2``). In TIL the old outputs are the old tasks' heads; in CIL
they are the old tasks' classes of the shared head, and the cross-entropy is taken over the current
task's classes only, so that learning new classes does not push the old logits down (the CIL
adaptation of LwF in FACIL and PyCIL; with a softmax over all classes LwF forgets as much as
fine-tuning on split-digits).
"""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import NON_NEGATIVE, POSITIVE, check_settings
from clax.transforms import classifier, distill

LWF_DEFAULTS = {"alpha": 1.0, "temperature": 2.0}
LWF_RULES = {"alpha": NON_NEGATIVE, "temperature": POSITIVE}
#: one line per setting, as ``clax list lwf`` prints it
LWF_HELP = {"alpha": "weight of the distillation loss on the old model's outputs",
            "temperature": "softmax temperature of the distillation"}


def lwf(ctx: Context, **settings) -> Method:
    """LwF with settings ``alpha`` (distillation weight) and ``temperature``."""
    s = check_settings("lwf", LWF_DEFAULTS, settings, LWF_RULES)
    return chain(classifier.model(ctx), distill.lwf(ctx, s["alpha"], s["temperature"]), name="lwf")
