"""Settings the frozen-backbone methods (CLR, Soft-TF) share: where the frozen backbone comes from, and the
checked public ``predict``. Their shared mechanisms (per-sample task dispatch, the record of trained tasks,
the pretrained backbone's report) are in :mod:`clax.transforms.frozen`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clax.methods.base import Context, Method
from clax.partition import CLState
from clax.pretrain import pretrained_backbone
from clax.settings import NON_NEGATIVE_INT, POSITIVE_INT
from clax.transforms.frozen import by_task, check_trained, mark_trained  # noqa: F401 (re-exported)

#: settings every frozen-backbone method has (see :func:`clax.pretrain.pretrained_backbone`): ``pretrained``
#: is ``"auto"`` (the checkpoint of ``backbone.pretrained=PATH`` frozen as loaded, else glyph pretraining),
#: ``"glyphs"``, ``"cifar10"`` (supervised pretraining on the CIFAR-10 class folder ``pretrain_data_dir``),
#: ``"none"`` or a ``.msgpack`` path.
PRETRAIN_DEFAULTS = {"pretrained": "auto", "pretrain_steps": 200, "pretrain_seed": 0, "pretrain_dir": "",
                     "pretrain_data_dir": ""}
PRETRAIN_RULES = {"pretrain_steps": POSITIVE_INT, "pretrain_seed": NON_NEGATIVE_INT}
#: one line per pretraining setting, as ``clax list clr`` prints it
PRETRAIN_HELP = {
    "pretrained": "frozen weights: auto, glyphs (offline pretraining), cifar10 (pretraining on the CIFAR-10 "
                  "folder pretrain_data_dir), none (random) or a .msgpack path",
    "pretrain_steps": "steps of the offline pretraining (glyphs or cifar10; cifar10 wants 1000 or more)",
    "pretrain_seed": "seed of the offline pretraining",
    "pretrain_dir": "cache of the pretrained weights (empty: the workdir's pretrain/)",
    "pretrain_data_dir": "CIFAR-10 class folder (train/<class>/*.jpg, test/<class>/*.jpg) for pretrained=cifar10",
}


def frozen_backbone(ctx: Context, s: dict, method: str):
    """``(params, batch_stats, pretraining report)`` of the frozen backbone described by settings ``s`` of
    method ``method`` (named in errors as ``<method>.pretrained``). A checkpoint given as
    ``backbone.pretrained`` is returned exactly as loaded; its report names the file and its SHA-256."""
    return pretrained_backbone(ctx.backbone, s["pretrained"], int(s["pretrain_steps"]), int(s["pretrain_seed"]),
                               s["pretrain_dir"], setting=f"{method}.pretrained",
                               data_dir=s.get("pretrain_data_dir", ""), data_setting=f"{method}.pretrain_data_dir")


def checked_predict(method: Method, cl: CLState, x, tid=None) -> jax.Array:
    """``method.predict`` compiled, after a host-side check that every id in ``tid`` has been trained.

    Raises:
      ValueError: naming an untrained task id.
    """
    check_trained(cl, tid)
    # jax.jit caches compilations per wrapped function, so re-wrapping here does not recompile
    return jax.jit(method.predict)(cl, x, None if tid is None else jnp.asarray(tid, jnp.int32))
