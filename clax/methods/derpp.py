"""DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning"): the
classifier and :func:`clax.transforms.rehearsal.derpp`: a reservoir memory that keeps the model's
logits, matched with an MSE (``alpha``) beside rehearsal cross-entropy (``beta``). Defaults: the
setting of the paper's hyperparameter table for Seq-MNIST with a 200-sample buffer (``alpha=0.2,
beta=1.0``; its Seq-CIFAR-10 setting is ``alpha=0.1, beta=0.5``).
"""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import NON_NEGATIVE, POSITIVE_INT, check_settings
from clax.transforms import classifier, rehearsal

DERPP_DEFAULTS = {"buffer_size": 200, "alpha": 0.2, "beta": 1.0}
DERPP_RULES = {"buffer_size": POSITIVE_INT, "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE}
#: one line per setting, as ``clax list derpp`` prints it
DERPP_HELP = {"buffer_size": "samples kept in the reservoir buffer, with their logits",
              "alpha": "weight of the MSE between stored and current logits",
              "beta": "weight of the cross-entropy on rehearsed samples"}


def derpp(ctx: Context, **settings) -> Method:
    """DER++ with settings ``buffer_size``, ``alpha`` (logit matching) and ``beta`` (rehearsal CE)."""
    s = check_settings("derpp", DERPP_DEFAULTS, settings, DERPP_RULES)
    return chain(classifier.model(ctx), rehearsal.derpp(int(s["buffer_size"]), ctx.input_shape, ctx.num_outputs,
                                                        s["alpha"], s["beta"]), name="derpp")
