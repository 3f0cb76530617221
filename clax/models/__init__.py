"""Backbones as pure functions: ``init(key) -> (params, batch_stats)`` and
``apply(params, batch_stats, x, train) -> (features, new_batch_stats)``.

BatchNorm statistics are explicit state, passed in and returned (empty dict for backbones without
BatchNorm). A backbone yields features; heads belong to the continual-learning method.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clax.models.mlp import MLP
from clax.models.resnet import STEMS, ResNet18, ResNet32
from clax.models.vit import ViT
from clax.settings import POSITIVE, POSITIVE_INT, WIDTHS, check_settings, one_of

PyTree = Any


class Backbone(NamedTuple):
    """A feature extractor as a pair of pure functions plus its shapes.

    Attributes:
      name: registry name.
      module: the Flax module (for parameter-path based transforms).
      input_shape: shape of one input.
      feature_dim: width of the returned features.
      view: which data view it consumes, ``"flat"`` or ``"image"``.
      init: ``key -> (params, batch_stats)``.
      apply: ``(params, batch_stats, x, train, **kwargs) -> (features [B, feature_dim], new_batch_stats)``;
        keyword arguments go to the module's call (the ViT's ``prompts``).
      pretrained: the checkpoint file that ``init`` returns (``backbone.pretrained=PATH``), ``""`` when
        ``init`` is a random initialisation.
      pretrained_sha256: the SHA-256 (hex) of that file's bytes as read when the backbone was built.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    feature_dim: int
    view: str
    init: Callable[[jax.Array], tuple[PyTree, PyTree]]
    apply: Callable[..., tuple[jax.Array, PyTree]]
    pretrained: str = ""
    pretrained_sha256: str = ""


#: XLA options of :func:`jit_init`'s compilation on the CPU (LLVM optimisation level 1 instead of 2)
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


#: XLA options for the compiled steps of a wide-enough ResNet-18 on the CPU (:func:`step_options`):
#: XLA's default set of YNNPACK library fusions (dots, convolutions, reductions) less the convolutions,
#: which then run as XLA's own
CONV_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
#: the narrowest ResNet-18 (``nf``) whose steps get :data:`CONV_CPU_OPTIONS`
CONV_CPU_MIN_NF = 12


@functools.lru_cache(maxsize=None)
def _accepts(options: tuple) -> bool:
    """Whether this jaxlib's CPU compiler takes ``options`` (an experimental XLA option may be renamed
    or dropped in another release: then clax compiles with XLA's defaults)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros((), jnp.float32)).compile()
        return True
    except Exception:  # noqa: BLE001 - an unknown option or value: keep XLA's defaults
        return False


def step_options(backbone: "Backbone | None") -> dict | None:
    """The XLA compiler options of the compiled steps (train, eval) of a model on ``backbone``, or None
    for XLA's defaults.

    On the CPU, XLA hands convolutions, dots and reductions to YNNPACK by default. For a ResNet-18 of
    width ``nf >= 12`` (:data:`CONV_CPU_MIN_NF`), the convolutions run faster as XLA's own
    (:data:`CONV_CPU_OPTIONS`); for the narrow ``nf=8`` YNNPACK's are faster. Train step of a plain
    ResNet-18, 32x32x3, Adam, on a 2-core CPU (``benchmarks/step_vs_torch.py`` and the same step at
    other widths), XLA's convolutions against YNNPACK's: nf=8 batch 32 1.23x (slower, so not used),
    nf=12 0.79x, nf=16 1.02x, nf=20 0.72-0.78x (batch 64) and 0.74x (batch 32), nf=64 0.76x.

    Only convolutions change, so models without one (MLPs) and every other backbone compile as before;
    on a ResNet-18 with ``nf >= 12`` the results differ from XLA's defaults in the last bits (another
    convolution kernel), and are the same from run to run. Other backends, or a jaxlib that does not
    know the option, get None.
    """
    if backbone is None or jax.default_backend() != "cpu":
        return None
    module = backbone.module
    if not (isinstance(module, ResNet18) and module.nf >= CONV_CPU_MIN_NF):
        return None
    return dict(CONV_CPU_OPTIONS) if _accepts(tuple(CONV_CPU_OPTIONS.items())) else None


def jit_init(fn: Callable) -> Callable:
    """``fn`` (an initialisation, e.g. ``key -> params``) compiled as one program; on the CPU at XLA's
    LLVM optimisation level 1 (:data:`INIT_CPU_OPTIONS`) rather than its default 2.

    An init runs once, and its random draws (threefry counters, truncated normals: one copy of each per
    parameter) are what LLVM's level 2 spends its time on: ResNet-18's init compiled in 5.3 s at level 2
    and 1.8 s at level 1 on a 2-core CPU, the 24 runs of the main job's method inits in 21.4 s against
    13.9 s. The values are bit for bit those of the default level (tests/test_pretrained.py checks the
    backbones' and several methods'; every registered method's init was checked once). Other backends
    get a plain ``jax.jit``.

    An init with ``stages = (first, rest)`` (a :func:`clax.compose.chain`'s: the model's init ``key ->
    state``, then the transforms' ``(key, state) -> state``) is compiled as those two programs: the
    first is the same program for every method on that model, so it compiles once and other runs read it
    from JAX's persistent cache (:mod:`clax.cache`). The values are the one-program init's bit for bit
    (tests/test_pretrained.py; the main job's 24 inits were checked once).
    """
    stages = getattr(fn, "stages", None)
    if stages is not None:
        first, rest = (jit_init(f) for f in stages)
        return lambda key: rest(key, first(key))
    options = INIT_CPU_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(fn, compiler_options=options)


def from_module(name: str, module: nn.Module, input_shape, view: str) -> Backbone:
    """Wraps a Flax module ``module(x, train)`` into a :class:`Backbone`."""
    input_shape = tuple(input_shape)
    dummy = jnp.zeros((1,) + input_shape, jnp.float32)

    def init(key):
        variables = module.init(key, dummy, train=False)
        return variables["params"], variables.get("batch_stats", {})

    def apply(params, batch_stats, x, train: bool = False, **kwargs):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train and batch_stats:
            feats, new = module.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
            return feats, new["batch_stats"]
        return module.apply(variables, x, train=False, **kwargs), batch_stats

    feature_dim = jax.eval_shape(lambda k: module.init_with_output(k, dummy, train=False)[0],
                                 jax.random.PRNGKey(0)).shape[-1]
    return Backbone(name, module, input_shape, int(feature_dim), view, init, apply)


#: name -> (module factory taking keyword settings, default settings, data view)
BACKBONES: dict[str, tuple[Callable[..., nn.Module], dict, str]] = {
    "mlp": (lambda hidden: MLP(tuple(hidden)), {"hidden": [256, 256]}, "flat"),
    "resnet18": (lambda nf, stem: ResNet18(nf, stem), {"nf": 20, "stem": "cifar", "pretrained": ""}, "image"),
    "resnet32": (lambda nf: ResNet32(nf), {"nf": 16}, "image"),
    "vit": (lambda patch, dim, depth, heads, mlp_ratio: ViT(patch, dim, depth, heads, mlp_ratio),
            {"patch": 8, "dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 2.0, "pretrained": ""}, "image"),
}


#: what each backbone setting must be beyond its default's type (see :mod:`clax.settings`)
BACKBONE_RULES: dict[str, dict] = {
    "mlp": {"hidden": WIDTHS},
    "resnet18": {"nf": POSITIVE_INT, "stem": one_of(*STEMS)},
    "resnet32": {"nf": POSITIVE_INT},
    "vit": {"patch": POSITIVE_INT, "dim": POSITIVE_INT, "depth": POSITIVE_INT, "heads": POSITIVE_INT,
            "mlp_ratio": POSITIVE},
}


def check_backbone_settings(name: str, settings: dict) -> dict:
    """Backbone ``name``'s settings merged over its defaults, each checked for type and range without
    building anything.

    Raises:
      ValueError: an unknown backbone or setting, or a bad value, naming it as ``backbone.key``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}")
    defaults = BACKBONES[name][1]
    unknown = set(settings) - set(defaults)
    if unknown:
        raise ValueError(f"backbone {name!r} has no setting {sorted(unknown)[0]!r}; valid: {', '.join(defaults)}")
    merged = check_settings("backbone", defaults, settings, BACKBONE_RULES.get(name))
    if name == "vit" and merged["dim"] % merged["heads"]:
        raise ValueError(f"backbone.dim={merged['dim']} must be divisible by backbone.heads={merged['heads']}")
    return merged


def backbone_view(name: str) -> str:
    """The data view (``"flat"`` or ``"image"``) that backbone ``name`` consumes."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name][2]


def get_backbone(name: str, input_shape, **settings) -> Backbone:
    """Builds backbone ``name`` for inputs of ``input_shape``; ``settings`` override its defaults.

    ``pretrained=PATH`` (resnet18, vit) makes ``init`` return the checkpoint's weights, whatever the
    key (see :mod:`clax.models.pretrained`); the checkpoint is read and checked against the shapes
    here, and the backbone records the path and the SHA-256 of the file (``Backbone.pretrained``,
    ``Backbone.pretrained_sha256``) so that runs can report which weights they used.
    """
    merged = check_backbone_settings(name, settings)
    factory, _, view = BACKBONES[name]
    pretrained = merged.pop("pretrained", "")
    module = factory(**merged)
    if pretrained:
        from clax.models.pretrained import load_into, module_overrides

        if name == "vit":
            module = module.clone(**module_overrides(pretrained))
    bb = from_module(name, module, input_shape, view)
    if not pretrained:
        return bb
    from clax.models.pretrained import file_sha256

    shapes = jax.eval_shape(bb.init, jax.random.PRNGKey(0))
    digest = file_sha256(pretrained)
    loaded = load_into(pretrained, *shapes)
    return bb._replace(init=lambda key: loaded, pretrained=pretrained, pretrained_sha256=digest)


__all__ = ["BACKBONES", "BACKBONE_RULES", "Backbone", "check_backbone_settings", "MLP", "ResNet18", "ResNet32", "ViT", "backbone_view", "from_module",
           "get_backbone", "step_options"]
