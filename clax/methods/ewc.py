"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017): the classifier and
:func:`clax.transforms.penalty.ewc`.

After each task the diagonal empirical Fisher information of the shared parameters is estimated from
per-sample gradients of the log-likelihood, summed over tasks, and the shared parameters are anchored:
``loss = CE + lambda / 2 * sum_i F_i (theta_i - theta*_i)^2``.
"""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import NON_NEGATIVE, POSITIVE_INT, check_settings
from clax.transforms import classifier, penalty

EWC_DEFAULTS = {"lambda": 1e5, "fisher_samples": 256}
EWC_RULES = {"lambda": NON_NEGATIVE, "fisher_samples": POSITIVE_INT}
#: one line per setting, as ``clax list ewc`` prints it
EWC_HELP = {"lambda": "strength of the quadratic penalty on moving important weights",
            "fisher_samples": "training samples per task for the empirical diagonal Fisher"}


def ewc(ctx: Context, **settings) -> Method:
    """EWC with settings ``lambda`` (penalty strength) and ``fisher_samples`` (per task)."""
    s = check_settings("ewc", EWC_DEFAULTS, settings, EWC_RULES)
    return chain(classifier.model(ctx), penalty.ewc(s["lambda"], int(s["fisher_samples"])), name="ewc")
