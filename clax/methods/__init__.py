"""Continual-learning methods: one file each, all built from :mod:`clax.transforms`."""
from __future__ import annotations

from typing import Callable, NamedTuple

from clax.methods.base import Context, Method, TaskData
from clax.methods.clr import CLR_DEFAULTS, clr
from clax.methods.ewc import EWC_DEFAULTS, ewc
from clax.methods.finetune import FINETUNE_DEFAULTS, JOINT_DEFAULTS, finetune, joint
from clax.methods.hembed import HEMBED_DEFAULTS, hembed
from clax.methods.hnet import HNET_DEFAULTS, hnet
from clax.methods.ibm import IBM_DEFAULTS, ibm
from clax.methods.lwf import LWF_DEFAULTS, lwf
from clax.methods.packnet import PACKNET_DEFAULTS, packnet
from clax.methods.pah import PAH_DEFAULTS, pah
from clax.methods.replay import REPLAY_DEFAULTS, replay
from clax.methods.soft_tf import SOFT_TF_DEFAULTS, soft_tf
from clax.methods.wsn import WSN_DEFAULTS, wsn


class MethodSpec(NamedTuple):
    """Registry entry: the factory ``(ctx, **settings) -> Method``, its settings and defaults."""

    factory: Callable[..., Method]
    defaults: dict
    summary: str
    backbone: str = "mlp"       # default backbone on the offline benchmarks
    scenarios: tuple = ("til", "cil")
    train: dict = {}            # overrides of the training-loop defaults
    backbone_settings: dict = {}  # overrides of the default backbone's settings


METHODS: dict[str, MethodSpec] = {
    "finetune": MethodSpec(finetune, FINETUNE_DEFAULTS, "sequential fine-tuning (lower bound)"),
    "joint": MethodSpec(joint, JOINT_DEFAULTS, "cumulative joint training (upper bound)"),
    "ewc": MethodSpec(ewc, EWC_DEFAULTS, "elastic weight consolidation (Kirkpatrick et al. 2017)"),
    "lwf": MethodSpec(lwf, LWF_DEFAULTS, "learning without forgetting (Li & Hoiem 2017)"),
    "replay": MethodSpec(replay, REPLAY_DEFAULTS, "experience replay, reservoir buffer"),
    # parameter isolation (issue 4); the same 10-epoch budget on the offline digits for all three
    "wsn": MethodSpec(wsn, WSN_DEFAULTS, "winning subnetworks: top-c% binary masks, union frozen (Kang et al. 2022)",
                      scenarios=("til",), train={"epochs": 10}),
    "packnet": MethodSpec(packnet, PACKNET_DEFAULTS,
                          "prune by magnitude, retrain, freeze (Mallya & Lazebnik 2018)",
                          scenarios=("til",), train={"epochs": 10}),
    "ibm": MethodSpec(ibm, IBM_DEFAULTS,
                      "information-bottleneck masked sub-networks (Chen et al. 2023)",
                      scenarios=("til",), train={"epochs": 10}),
    # hypernetworks (issue 5): the whole MLP target (backbone + head) is generated; 20 epochs on digits
    "hnet": MethodSpec(hnet, HNET_DEFAULTS, "task-conditioned chunked hypernetwork, HNET+ENT in CIL (von Oswald et al. 2020)",
                       train={"epochs": 20}, backbone_settings={"hidden": [100, 100]}),
    "hembed": MethodSpec(hembed, HEMBED_DEFAULTS, "hypernetwork guided by H-score task embeddings (Wu et al. 2025)",
                         scenarios=("til",), train={"epochs": 20}, backbone_settings={"hidden": [100, 100]}),
    "pah": MethodSpec(pah, PAH_DEFAULTS, "prototype-augmented hypernetwork heads, two-step distillation (De La Fuente et al. 2025)",
                      scenarios=("til",), train={"epochs": 10, "optimizer": "adamw", "weight_decay": 0.01}),
    # frozen backbones (issue 3): pretrained offline on synthetic glyphs (clax.pretrain), cached per workdir
    "clr": MethodSpec(clr, CLR_DEFAULTS, "channel-wise lightweight reprogramming of a frozen CNN (Ge et al. 2023)",
                      backbone="resnet18", scenarios=("til",), train={"epochs": 3, "weight_decay": 1e-5},
                      backbone_settings={"nf": 8}),
    "soft_tf": MethodSpec(soft_tf, SOFT_TF_DEFAULTS, "per-task soft masks on a frozen ViT (Kang & Yoo 2024)",
                          backbone="vit", train={"epochs": 5, "lr": 1e-2, "clip": 1.0},
                          backbone_settings={"depth": 3}),
}


def get_method(name: str, ctx: Context, **settings) -> Method:
    """Builds method ``name`` for the stream described by ``ctx``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    spec = METHODS[name]
    unknown = set(settings) - set(spec.defaults)
    if unknown:
        raise ValueError(f"method {name!r} has no setting {sorted(unknown)[0]!r}; valid: "
                         f"{', '.join(spec.defaults) or '(none)'}")
    return spec.factory(ctx, **settings)


__all__ = ["METHODS", "Context", "Method", "MethodSpec", "TaskData", "ewc", "finetune", "get_method", "hembed", "hnet",
           "ibm", "joint", "lwf", "packnet", "pah", "replay", "wsn"]
