"""Continual-learning methods: one file each, all built from :mod:`clax.transforms`."""
from __future__ import annotations

from typing import Callable, NamedTuple

from clax.methods.base import Context, Method, TaskData
from clax.compose import join
from clax.methods.clr import CLR_DEFAULTS, CLR_RULES, clr
from clax.methods.derpp import DERPP_DEFAULTS, DERPP_RULES, derpp
from clax.methods.ewc import EWC_DEFAULTS, EWC_RULES, ewc
from clax.methods.finetune import FINETUNE_DEFAULTS, JOINT_DEFAULTS, finetune, joint
from clax.methods.hembed import HEMBED_DEFAULTS, HEMBED_RULES, hembed
from clax.methods.hnet import HNET_DEFAULTS, HNET_RULES, hnet
from clax.methods.ibm import IBM_DEFAULTS, IBM_RULES, ibm
from clax.methods.lwf import LWF_DEFAULTS, LWF_RULES, lwf
from clax.methods.packnet import PACKNET_DEFAULTS, PACKNET_RULES, packnet
from clax.methods.pah import PAH_DEFAULTS, PAH_RULES, pah
from clax.methods.replay import REPLAY_DEFAULTS, REPLAY_RULES, replay
from clax.methods.si import SI_DEFAULTS, SI_RULES, si
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
    own_model: bool = False     # a network of its own (not the default classifier): see clax.compose.join


METHODS: dict[str, MethodSpec] = {
    "finetune": MethodSpec(finetune, FINETUNE_DEFAULTS, "sequential fine-tuning (lower bound)"),
    "joint": MethodSpec(joint, JOINT_DEFAULTS, "cumulative joint training (upper bound)"),
    "ewc": MethodSpec(ewc, EWC_DEFAULTS, "elastic weight consolidation (Kirkpatrick et al. 2017)", rules=EWC_RULES),
    "lwf": MethodSpec(lwf, LWF_DEFAULTS, "learning without forgetting (Li & Hoiem 2017)", rules=LWF_RULES),
    "replay": MethodSpec(replay, REPLAY_DEFAULTS, "experience replay, reservoir buffer", rules=REPLAY_RULES),
    "derpp": MethodSpec(derpp, DERPP_DEFAULTS, "dark experience replay++: rehearsal with stored logits (Buzzega et al. 2020)",
                        rules=DERPP_RULES),
    "si": MethodSpec(si, SI_DEFAULTS, "synaptic intelligence (Zenke et al. 2017)", rules=SI_RULES),
    # parameter isolation (issue 4); the same 10-epoch budget on the offline digits for all three
    "wsn": MethodSpec(wsn, WSN_DEFAULTS, "winning subnetworks: top-c% binary masks, union frozen (Kang et al. 2022)",
                      scenarios=("til",), train={"epochs": 10}, rules=WSN_RULES, own_model=True),
    "packnet": MethodSpec(packnet, PACKNET_DEFAULTS,
                          "prune by magnitude, retrain, freeze (Mallya & Lazebnik 2018)",
                          scenarios=("til",), train={"epochs": 10}, rules=PACKNET_RULES, own_model=True),
    "ibm": MethodSpec(ibm, IBM_DEFAULTS,
                      "information-bottleneck masked sub-networks (Chen et al. 2023)",
                      scenarios=("til",), train={"epochs": 10}, rules=IBM_RULES, own_model=True),
    # hypernetworks (issue 5): the whole MLP target (backbone + head) is generated; 20 epochs on digits
    "hnet": MethodSpec(hnet, HNET_DEFAULTS, "task-conditioned chunked hypernetwork, HNET+ENT in CIL (von Oswald et al. 2020)",
                       train={"epochs": 20}, backbone_settings={"hidden": [100, 100]}, rules=HNET_RULES, own_model=True),
    "hembed": MethodSpec(hembed, HEMBED_DEFAULTS, "hypernetwork guided by H-score task embeddings (Wu et al. 2025)",
                         scenarios=("til",), train={"epochs": 20}, backbone_settings={"hidden": [100, 100]},
                         rules=HEMBED_RULES, own_model=True),
    "pah": MethodSpec(pah, PAH_DEFAULTS, "prototype-augmented hypernetwork heads, two-step distillation (De La Fuente et al. 2025)",
                      scenarios=("til",), train={"epochs": 10, "optimizer": "adamw", "weight_decay": 0.01},
                      rules=PAH_RULES, own_model=True),
    # frozen backbones (issue 3): pretrained offline on synthetic glyphs (clax.pretrain), cached per workdir
    "clr": MethodSpec(clr, CLR_DEFAULTS, "channel-wise lightweight reprogramming of a frozen CNN (Ge et al. 2023)",
                      backbone="resnet18", scenarios=("til",), train={"epochs": 3, "weight_decay": 1e-5},
                      backbone_settings={"nf": 8}, rules=CLR_RULES, own_model=True),
    "soft_tf": MethodSpec(soft_tf, SOFT_TF_DEFAULTS, "per-task soft masks on a frozen ViT (Kang & Yoo 2024)",
                          backbone="vit", train={"epochs": 5, "lr": 1e-2, "clip": 1.0},
                          backbone_settings={"depth": 3}, rules=SOFT_TF_RULES, own_model=True),
}


def parts(name: str) -> list[str]:
    """The registered methods ``name`` joins: ``"replay+lwf"`` -> ``["replay", "lwf"]``.

    Raises:
      ValueError: an unknown part or a part named twice, listing the valid names.
    """
    out = name.split("+") if isinstance(name, str) else [name]
    for p in out:
        if p not in METHODS:
            raise ValueError(f"unknown method {p!r}" + (f" in {name!r}" if len(out) > 1 else "")
                             + f"; valid: {', '.join(sorted(METHODS))} (join them with '+', e.g. replay+lwf)")
    if len(set(out)) < len(out):
        raise ValueError(f"method {name!r} names a part twice")
    return out


def spec_of(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a registered method or of methods joined with ``+``.

    A joined spec takes its backbone, backbone settings and training overrides from the part with a
    network of its own (``own_model``: at most one; the others' training overrides apply first), its
    scenarios are those every part supports, and its ``defaults`` are ``{part: part's defaults}``.

    Raises:
      ValueError: as :func:`parts`; two parts with a network of their own; no scenario every part supports.
    """
    names = parts(name)
    if len(names) == 1:
        return METHODS[names[0]]
    specs = [METHODS[n] for n in names]
    owners = [n for n, sp in zip(names, specs) if sp.own_model]
    if len(owners) > 1:
        raise ValueError(f"{owners[0]} and {owners[1]} both own the network and its head; "
                         f"method {name!r} can have one of them")
    main = METHODS[owners[0]] if owners else specs[0]
    scen = tuple(sc for sc in ("til", "cil") if all(sc in sp.scenarios for sp in specs))
    if not scen:
        raise ValueError(f"method {name!r}: its parts support no common scenario ("
                         + "; ".join(f"{n}: {'/'.join(sp.scenarios)}" for n, sp in zip(names, specs)) + ")")
    train: dict = {}
    for sp in specs:
        if sp is not main:
            train.update(sp.train)
    return MethodSpec(None, {n: sp.defaults for n, sp in zip(names, specs)},
                      " + ".join(sp.summary.split(":")[0].split(",")[0] for sp in specs), main.backbone, scen,
                      {**train, **main.train}, main.backbone_settings, {}, bool(owners))


def check_scenario_of(name: str, scenario: str) -> None:
    """Raises ValueError when method ``name`` (or a part of it) does not support ``scenario``, naming the part."""
    for p in parts(name):
        if scenario not in METHODS[p].scenarios:
            joined = f" (in {name!r})" if p != name else ""
            raise ValueError(f"{p}{joined} supports {'/'.join(METHODS[p].scenarios)} only, not scenario "
                             f"{scenario!r}")


def check_method_settings(name: str, settings: dict) -> dict:
    """Method ``name``'s settings merged over its defaults, every one checked for type and range
    (:func:`clax.settings.check_settings`) without building anything; what depends on the stream or
    the backbone is checked by the factory. For methods joined with ``+``, ``settings`` is
    ``{part: that part's settings}``.

    Raises:
      ValueError: an unknown method or setting, or a bad value, naming the setting as ``method.key``.
    """
    names = parts(name)
    if len(names) > 1:
        return {p: check_method_settings(p, settings.get(p, {})) for p in names}
    spec = METHODS[name]
    unknown = set(settings) - set(spec.defaults)
    if unknown:
        raise ValueError(f"method {name!r} has no setting {sorted(unknown)[0]!r}; valid: "
                         f"{', '.join(spec.defaults) or '(none)'}")
    return check_settings(name, spec.defaults, settings, spec.rules)


def get_method(name: str, ctx: Context, **settings) -> Method:
    """Builds method ``name`` for the stream described by ``ctx``. For methods joined with ``+``
    (``"replay+lwf"``), ``settings`` maps each part to its settings and the parts are joined with
    :func:`clax.compose.join`.

    Raises:
      ValueError: an unknown method or setting, or an impossible combination, naming the parts.
    """
    names = parts(name)
    check_method_settings(name, settings)
    if len(names) == 1:
        return METHODS[name].factory(ctx, **settings)
    spec_of(name)
    check_scenario_of(name, ctx.scenario)
    return join(*[METHODS[p].factory(ctx, **settings.get(p, {})) for p in names], scenario=ctx.scenario)


def setting_help(name: str) -> dict:
    """One line per setting of registered method ``name``, for ``clax list METHOD``: the ``<NAME>_HELP``
    dict beside its ``<NAME>_DEFAULTS`` in the factory's module (empty for a method without settings)."""
    import sys

    spec = METHODS[name]
    return dict(getattr(sys.modules[spec.factory.__module__], f"{name.upper()}_HELP", {}))


def method_settings(cfg: dict) -> dict:
    """The settings :func:`get_method` takes for a config: the method's section, or for methods joined
    with ``+`` ``{part: its section}``."""
    names = parts(cfg["method"])
    if len(names) == 1:
        return dict(cfg.get(names[0]) or {})
    return {p: dict(cfg.get(p) or {}) for p in names}


__all__ = ["METHODS", "Context", "check_method_settings", "check_scenario_of", "derpp", "get_method", "join",
           "Method", "MethodSpec", "method_settings", "parts", "setting_help", "si", "spec_of", "TaskData", "ewc", "finetune",
           "hembed", "hnet", "ibm", "joint", "lwf", "packnet", "pah", "replay", "wsn"]
