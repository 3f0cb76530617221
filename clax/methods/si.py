"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017): the classifier and
:func:`clax.transforms.penalty.si`, whose importance is accumulated from each step's gradient and
update inside the compiled step (no second backward pass)."""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import NON_NEGATIVE, POSITIVE, check_settings
from clax.transforms import classifier, penalty

SI_DEFAULTS = {"c": 0.1, "xi": 1e-3}
SI_RULES = {"c": NON_NEGATIVE, "xi": POSITIVE}
#: one line per setting, as ``clax list si`` prints it
SI_HELP = {"c": "strength of the path-integral penalty", "xi": "damping of the importance's denominator"}


def si(ctx: Context, **settings) -> Method:
    """SI with settings ``c`` (penalty strength) and ``xi`` (damping)."""
    s = check_settings("si", SI_DEFAULTS, settings, SI_RULES)
    return chain(classifier.model(ctx), penalty.si(s["c"], s["xi"]), name="si")
