"""Continual-learning methods: one file each, all built from :mod:`clax.transforms`."""
from __future__ import annotations

from typing import Callable, NamedTuple

from clax.methods.base import Context, Method, TaskData
from clax.methods.clr import CLR_DEFAULTS, CLR_RULES, clr
from clax.methods.ewc import EWC_DEFAULTS, EWC_RULES, ewc
from clax.methods.finetune import FINETUNE_DEFAULTS, JOINT_DEFAULTS, finetune, joint
from clax.methods.hembed import HEMBED_DEFAULTS, HEMBED_RULES, hembed
from clax.methods.hnet import HNET_DEFAULTS, HNET_RULES, hnet
from clax.methods.ibm import IBM_DEFAULTS, IBM_RULES, ibm
from clax.methods.lwf import LWF_DEFAULTS, LWF_RULES, lwf
from clax.methods.packnet import PACKNET_DEFAULTS, PACKNET_RULES, packnet
from clax.methods.pah import PAH_DEFAULTS, PAH_RULES, pah
from clax.methods.replay import REPLAY_DEFAULTS, REPLAY_RULES, replay
from clax.methods.soft_tf import SOFT_TF_DEFAULTS, SOFT_TF_RULES, soft_tf
from clax.methods.wsn import WSN_DEFAULTS, WSN_RULES, wsn
from clax.settings import check_settings


class MethodSpec(NamedTuple):
    """Registry entry: the factory ``(ctx, **settings) -> Method``, its settings and defaults."""

    factory: Callable[..., Method]
    defaults: dict
    summary: str
    backbone: str = "mlp"       # default backbone on the offline benchmarks
    scenarios: tuple = ("til", "cil")
    train: dict = {}            # overrides of the training-loop defaults
    backbone_settings: dict = {}  # overrides of the default backbone's settings
    rules: dict = {}            # what each setting must be beyond its default's type (clax.settings.Rule)


METHODS: dict[str, MethodSpec] = {
    "finetune": MethodSpec(finetune, FINETUNE_DEFAULTS, "sequential fine-tuning (lower bound)"),
    "joint": MethodSpec(joint, JOINT_DEFAULTS, "cumulative joint training (upper bound)"),
    "ewc": MethodSpec(ewc, EWC_DEFAULTS, "elastic weight consolidation (Kirkpatrick et al. 2017)", rules=EWC_RULES),
    "lwf": MethodSpec(lwf, LWF_DEFAULTS, "learning without forgetting (Li & Hoiem 2017)", rules=LWF_RULES),
    "replay": MethodSpec(replay, REPLAY_DEFAULTS, "experience replay, reservoir buffer", rules=REPLAY_RULES),
    # parameter isolation (issue 4); the same 10-epoch budget on the offline digits for all three
    "wsn": MethodSpec(wsn, WSN_DEFAULTS, "winning subnetworks: top-c% binary masks, union frozen (Kang et al. 2022)",
                      scenarios=("til",), train={"epochs": 10}, rules=WSN_RULES),
    "packnet": MethodSpec(packnet, PACKNET_DEFAULTS,
                          "prune by magnitude, retrain, freeze (Mallya & Lazebnik 2018)",
                          scenarios=("til",), train={"epochs": 10}, rules=PACKNET_RULES),
    "ibm": MethodSpec(ibm, IBM_DEFAULTS,
                      "information-bottleneck masked sub-networks (Chen et al. 2023)",
                      scenarios=("til",), train={"epochs": 10}, rules=IBM_RULES),
    # hypernetworks (issue 5): the whole MLP target (backbone + head) is generated; 20 epochs on digits
    "hnet": MethodSpec(hnet, HNET_DEFAULTS, "task-conditioned chunked hypernetwork, HNET+ENT in CIL (von Oswald et al. 2020)",
                       train={"epochs": 20}, backbone_settings={"hidden": [100, 100]}, rules=HNET_RULES),
    "hembed": MethodSpec(hembed, HEMBED_DEFAULTS, "hypernetwork guided by H-score task embeddings (Wu et al. 2025)",
                         scenarios=("til",), train={"epochs": 20}, backbone_settings={"hidden": [100, 100]},
                         rules=HEMBED_RULES),
    "pah": MethodSpec(pah, PAH_DEFAULTS, "prototype-augmented hypernetwork heads, two-step distillation (De La Fuente et al. 2025)",
                      scenarios=("til",), train={"epochs": 10, "optimizer": "adamw", "weight_decay": 0.01},
                      rules=PAH_RULES),
    # frozen backbones (issue 3): pretrained offline on synthetic glyphs (clax.pretrain), cached per workdir
    "clr": MethodSpec(clr, CLR_DEFAULTS, "channel-wise lightweight reprogramming of a frozen CNN (Ge et al. 2023)",
                      backbone="resnet18", scenarios=("til",), train={"epochs": 3, "weight_decay": 1e-5},
                      backbone_settings={"nf": 8}, rules=CLR_RULES),
    "soft_tf": MethodSpec(soft_tf, SOFT_TF_DEFAULTS, "per-task soft masks on a frozen ViT (Kang & Yoo 2024)",
                          backbone="vit", train={"epochs": 5, "lr": 1e-2, "clip": 1.0},
                          backbone_settings={"depth": 3}, rules=SOFT_TF_RULES),
}


def check_method_settings(name: str, settings: dict) -> dict:
    """Method ``name``'s settings merged over its defaults, every one checked for type and range
    (:func:`clax.settings.check_settings`) without building anything; what depends on the stream or
    the backbone is checked by the factory.

    Raises:
      ValueError: an unknown method or setting, or a bad value, naming the setting as ``method.key``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    spec = METHODS[name]
    unknown = set(settings) - set(spec.defaults)
    if unknown:
        raise ValueError(f"method {name!r} has no setting {sorted(unknown)[0]!r}; valid: "
                         f"{', '.join(spec.defaults) or '(none)'}")
    return check_settings(name, spec.defaults, settings, spec.rules)


def get_method(name: str, ctx: Context, **settings) -> Method:
    """Builds method ``name`` for the stream described by ``ctx``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    check_method_settings(name, settings)
    return METHODS[name].factory(ctx, **settings)


__all__ = ["METHODS", "Context", "check_method_settings", "Method", "MethodSpec", "TaskData", "ewc", "finetune", "get_method", "hembed", "hnet",
           "ibm", "joint", "lwf", "packnet", "pah", "replay", "wsn"]
