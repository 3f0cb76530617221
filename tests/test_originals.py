"""The importers against the ORIGINAL model code (timm's VisionTransformer, torchvision's resnet18), at
small scale: random weights (biases, norm affines and BatchNorm statistics perturbed off their identity
init), saved as ``.safetensors`` and ``.pth`` state dicts, loaded through ``get_backbone(...,
pretrained=PATH)`` (the CLI's path) and compared with the original's pre-logits features to 1e-4 of
the feature scale. A wrong conversion (a spatially transposed conv kernel, a transposed Dense kernel)
must fail the same comparison. Skips where timm / torchvision are not installed (CI);
``benchmarks/check_originals.py`` is the full-size ViT-B/16 and ResNet-18 check."""
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the original models need torch")
pytest.importorskip("safetensors.torch", reason="saving .safetensors from torch needs safetensors")
if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
    pytest.skip("timm and torchvision are not installed (pip install timm torchvision)", allow_module_level=True)

from clax.models import get_backbone  # noqa: E402
from clax.models import pretrained  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from check_originals import import_originals, randomise, save_formats  # noqa: E402

TOL = 1e-4


def _clax(name, settings, path, x_nhwc, edit=None):
    bb = get_backbone(name, x_nhwc.shape[1:], **settings, pretrained=path)
    params, stats = bb.init(jax.random.PRNGKey(0))
    if edit is not None:
        params = edit(params)
    return np.asarray(bb.apply(params, stats, x_nhwc, train=False)[0])


def _rel(ref, got):
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.abs(ref - got).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    _, timm, tvm, _ = import_originals()
    tv = timm.models.vision_transformer
    torch.manual_seed(0)
    tmp = str(tmp_path_factory.mktemp("originals"))
    # timm's ViT-B/16 class at small scale: same key layout (patch_embed.proj, cls_token, pos_embed,
    # blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head)
    vit = randomise(torch, tv.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                          num_classes=5))
    resnet = randomise(torch, tvm.resnet18(weights=None))
    g = torch.Generator().manual_seed(1)
    x_vit = torch.randn(2, 3, 32, 32, generator=g)
    x_res = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        f_vit = vit.forward_head(vit.forward_features(x_vit), pre_logits=True).numpy()
        fc, resnet.fc = resnet.fc, torch.nn.Identity()  # everything up to fc
        f_res = resnet(x_res).numpy()
        resnet.fc = fc  # saved with its head, as the real state dict is (clax skips it)
    out = {
        "vit": dict(paths=dict(zip((".safetensors", ".pth"), save_formats(torch, vit, tmp, "vit"))), x=x_vit.permute(0, 2, 3, 1).numpy(), ref=f_vit, name="vit",
                    settings=dict(patch=8, dim=32, depth=2, heads=2, mlp_ratio=4.0)),
        "resnet": dict(paths=dict(zip((".safetensors", ".pth"), save_formats(torch, resnet, tmp, "resnet"))), x=x_res.permute(0, 2, 3, 1).numpy(), ref=f_res,
                       name="resnet18", settings=dict(nf=64, stem="imagenet")),
    }
    return out


@pytest.mark.parametrize("fmt", [".safetensors", ".pth"])
@pytest.mark.parametrize("model", ["vit", "resnet"])
def test_importer_matches_original(originals, model, fmt):
    c = originals[model]
    assert pretrained.checkpoint_kind(c["paths"][fmt]) == {"vit": "timm_vit", "resnet": "torchvision_resnet"}[model]
    got = _clax(c["name"], c["settings"], c["paths"][fmt], c["x"])
    assert _rel(c["ref"], got) <= TOL


@pytest.mark.parametrize("model", ["vit", "resnet"])
def test_wrong_conversion_is_caught(originals, model, monkeypatch):
    """Negative controls: the same comparison fails when the conversion is wrong."""
    c = originals[model]
    path = c["paths"][".safetensors"]
    # torch [O, I, kh, kw] -> [kw, kh, I, O]: a spatially transposed kernel (the shapes still fit)
    with monkeypatch.context() as m:
        m.setattr(pretrained, "_conv", lambda w: np.ascontiguousarray(np.asarray(w).transpose(3, 2, 1, 0)))
        assert _rel(c["ref"], _clax(c["name"], c["settings"], path, c["x"])) > 10 * TOL
    if model == "vit":  # a square Dense kernel left in torch's [out, in] order
        def transpose_proj(params):
            params = jax.tree_util.tree_map(lambda a: a, params)  # a copy of the tree structure
            params["blocks_0"]["attn"]["proj"]["kernel"] = params["blocks_0"]["attn"]["proj"]["kernel"].T
            return params

        assert _rel(c["ref"], _clax(c["name"], c["settings"], path, c["x"], edit=transpose_proj)) > 10 * TOL
