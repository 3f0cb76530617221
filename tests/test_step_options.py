"""The XLA options of the compiled steps (clax.models.step_options): which backbones get them, that the
trainer's steps are compiled with them, and that an option this jaxlib does not know is dropped."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clax import train as T
from clax.data import get_benchmark
from clax.methods import get_method
from clax.models import CONV_CPU_OPTIONS, _accepts, get_backbone, step_options
from clax.train import Steps, TrainConfig, make_context, make_optimizer

CPU = jax.default_backend() == "cpu"


@pytest.mark.parametrize("name,kw,want", [
    ("resnet18", {"nf": 20}, True), ("resnet18", {"nf": 12}, True),
    ("resnet18", {"nf": 64, "stem": "imagenet"}, True), ("resnet18", {"nf": 8}, False),
    ("resnet32", {}, False), ("vit", {"depth": 1}, False), ("mlp", {}, False)])
def test_which_backbones(name, kw, want):
    bb = get_backbone(name, (64,) if name == "mlp" else (32, 32, 3), **kw)
    assert step_options(bb) == (CONV_CPU_OPTIONS if want and CPU else None)
    assert step_options(None) is None


def test_unknown_option_is_dropped():
    assert _accepts(tuple(CONV_CPU_OPTIONS.items())) == CPU
    assert not _accepts((("xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_FUSION_TYPE"),))


@pytest.mark.skipif(not CPU, reason="the options are the CPU compiler's")
def test_steps_compile_with_the_options():
    """The eval step of a ResNet-18 (nf=12) compiled with the options hands fewer convolutions to
    YNNPACK than with XLA's defaults, and the two count the same correct predictions on a small batch."""
    bench = get_benchmark("split-digits", view="image")
    ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=12), bench, "til")
    method = get_method("finetune", ctx)
    cl = method.init(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).random((4, *bench.input_shape), np.float32))
    batch = {"x": x, "y": jnp.zeros(4, jnp.int32), "w": jnp.ones(4, jnp.float32)}
    texts, outs = {}, {}
    for label, opts in (("ynn", None), ("xla", step_options(ctx.backbone))):
        st = Steps(method, make_optimizer(TrainConfig(), method), "til", opts)
        texts[label] = st.eval_step.lower(cl, batch, jnp.int32(0)).compile().as_text()
        outs[label] = st.eval_step(cl, batch, jnp.int32(0))
    assert _ynn_convolutions(texts["xla"]) < _ynn_convolutions(texts["ynn"])  # 1 of 20 against 9 (jax 0.10.2)
    assert "convolution(" in texts["xla"]
    assert int(outs["xla"][0]) == int(outs["ynn"][0])


def _ynn_convolutions(hlo: str) -> int:
    """How many of a compiled module's YNNPACK fusions hold a convolution."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S)}
    called = [re.search(r"calls=%([\w.\-]+)", line).group(1) for line in hlo.splitlines()
              if "__ynn_fusion" in line and "calls=" in line]
    return sum("convolution(" in bodies.get(name, "") for name in called)


def test_fit_passes_the_backbones_options(monkeypatch):
    """fit builds its steps with step_options of the run's backbone (stopped before anything compiles)."""
    seen = []

    class Stop(Exception):
        pass

    class Spy(Steps):
        def __init__(self, method, tx, scenario, compiler_options=None):
            seen.append(compiler_options)
            raise Stop

    monkeypatch.setattr(T, "Steps", Spy)
    bench = get_benchmark("split-digits", view="image")
    for nf in (12, 8):
        ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=nf), bench, "til")
        with pytest.raises(Stop):
            T.fit(get_method("finetune", ctx), ctx, bench, TrainConfig(epochs=1), progress=False)
    assert seen == [step_options(make_context(get_backbone("resnet18", bench.input_shape, nf=12), bench,
                                              "til").backbone), None]
    assert (seen[0] is not None) == CPU
