"""Experience replay with a reservoir buffer (Chaudhry et al. 2019, "tiny episodic memories"): the
classifier and :func:`clax.transforms.rehearsal.replay`.

A fixed-size memory holds ``buffer_size`` past samples (inputs, targets, task ids), filled by
reservoir sampling over the stream, so every sample seen so far is equally likely to be kept. Each
training batch is concatenated with an equally large batch drawn from the memory; the loss is the
current task's cross-entropy plus the memory rows' (term ``replay``).
"""
from __future__ import annotations

from clax.compose import chain
from clax.methods.base import Context, Method
from clax.settings import POSITIVE_INT, check_settings
from clax.transforms import classifier, rehearsal

REPLAY_DEFAULTS = {"buffer_size": 200}
REPLAY_RULES = {"buffer_size": POSITIVE_INT}
#: one line per setting, as ``clax list replay`` prints it
REPLAY_HELP = {"buffer_size": "samples kept in the reservoir buffer and rehearsed"}


def replay(ctx: Context, **settings) -> Method:
    """Experience replay with setting ``buffer_size`` (number of stored samples)."""
    s = check_settings("replay", REPLAY_DEFAULTS, settings, REPLAY_RULES)
    return chain(classifier.model(ctx), rehearsal.replay(int(s["buffer_size"]), ctx.input_shape), name="replay")
