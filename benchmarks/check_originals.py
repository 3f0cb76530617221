"""clax's checkpoint importers against the original model code: timm ViT-B/16 and torchvision ResNet-18.

Builds ``timm.create_model("vit_base_patch16_224", pretrained=False)`` and
``torchvision.models.resnet18(weights=None)`` with random weights (torch seed 0; every parameter is
perturbed, so no bias or LayerNorm/BatchNorm affine is at its identity init, and the ResNet's BatchNorm
running mean/var are random, so eval-mode BN is not the identity), puts both in eval mode, and saves each
state dict in the real formats: ``.safetensors`` (``safetensors.torch.save_file``) and ``.pth``
(``torch.save`` of the state dict; clax reads it back only through ``torch.load(weights_only=True)``).

Each checkpoint is loaded the way a user loads it, ``get_backbone(name, input_shape, **settings,
pretrained=PATH)`` (what ``--set backbone.pretrained=PATH`` reaches through ``clax.runner.build``), with
the README's settings (ViT-B/16: patch 16, dim 768, depth 12, heads 12, mlp_ratio 4; ResNet-18: nf 64,
stem imagenet). clax's backbone features on a random batch of 4 images 224 x 224 are compared with the
original's pre-logits features on the same batch (NCHW there, NHWC in clax):

* timm: ``forward_head(forward_features(x), pre_logits=True)`` (final norm, class token);
* torchvision: the network with ``fc`` replaced by ``Identity`` (global-average-pooled ``layer4``).

clax's importers skip the classifier heads (``head``, ``fc``), so logits are not compared: a backbone
yields features, heads belong to the continual-learning method.

Printed per model and format: max abs diff, the feature scale (max |original|), the max relative diff
max abs diff / scale (the figure held to the tolerance; an elementwise ratio would blow up on features
that are near zero), the relative L2 error ||clax - original|| / ||original||, and seconds.
Also checks that the ``.safetensors`` and ``.pth`` routes give identical clax features. Exits 1 if max
abs diff / scale exceeds ``--tol`` (default 1e-4, issue 6's tolerance) for any model and format.

    python benchmarks/check_originals.py [--batch 4] [--tol 1e-4] [--only vit|resnet]

Where torchvision's compiled extension cannot load (a CUDA torchvision wheel beside a CPU torch, as on
this project's CPU machines), the pure-Python model code is imported without running
``torchvision/__init__`` (which registers the detection ops' kernels); the models are the same code.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import types

import numpy as np


def import_originals():
    """``(torch, timm, torchvision.models, note)``; ``note`` says whether the torchvision shim was used."""
    import torch

    note = ""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:  # "operator torchvision::nms does not exist": _C.so does not fit this torch
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        spec = importlib.util.find_spec("torchvision")
        pkg = types.ModuleType("torchvision")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        sys.modules["torchvision"] = pkg
        note = f"torchvision imported without its C extension ({e})"
    import timm
    import torchvision.models as tvm

    return torch, timm, tvm, note


def randomise(torch, model, seed=0):
    """Every parameter perturbed (vectors by 0.1 N(0,1), so biases and norm affines are not at their
    identity init); BatchNorm running mean N(0, 0.1^2) and var U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def save_formats(torch, model, directory, stem):
    """The model's state dict as ``.safetensors`` and ``.pth``; returns both paths."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    st, pth = os.path.join(directory, stem + ".safetensors"), os.path.join(directory, stem + ".pth")
    save_file(sd, st)
    torch.save(sd, pth)
    return st, pth


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"feature shapes differ: original {ref.shape}, clax {got.shape}")
    d = np.abs(ref - got)
    scale = float(np.abs(ref).max())
    return {"max_abs": float(d.max()), "scale": scale, "rel_to_scale": float(d.max() / scale),
            "rel_l2": float(np.linalg.norm(ref - got) / np.linalg.norm(ref))}


def clax_features(name, settings, path, x_nhwc):
    """Features of clax's backbone built with ``pretrained=path`` (the CLI's path), and seconds."""
    import jax

    from clax.models import get_backbone

    t0 = time.perf_counter()
    bb = get_backbone(name, x_nhwc.shape[1:], **settings, pretrained=path)
    params, stats = bb.init(jax.random.PRNGKey(0))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats, _ = jax.jit(lambda p, s, x: bb.apply(p, s, x, train=False))(params, stats, x_nhwc)
    feats = np.asarray(jax.block_until_ready(feats))
    return feats, t_load, time.perf_counter() - t0


CASES = {
    "vit": dict(title="timm vit_base_patch16_224", clax="vit",
                settings=dict(patch=16, dim=768, depth=12, heads=12, mlp_ratio=4.0)),
    "resnet": dict(title="torchvision resnet18", clax="resnet18", settings=dict(nf=64, stem="imagenet")),
}


def build_original(key, torch, timm, tvm):
    if key == "vit":
        m = randomise(torch, timm.create_model("vit_base_patch16_224", pretrained=False))
        return m, lambda x: m.forward_head(m.forward_features(x), pre_logits=True)
    m = randomise(torch, tvm.resnet18(weights=None))

    def feats(x):  # everything up to fc: the model with fc -> Identity
        fc, m.fc = m.fc, torch.nn.Identity()
        try:
            return m(x)
        finally:
            m.fc = fc

    return m, feats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--only", choices=sorted(CASES), default=None)
    args = ap.parse_args(argv)

    torch, timm, tvm, note = import_originals()
    import jax
    import torchvision

    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, timm {timm.__version__}, "
          f"torchvision {getattr(torchvision, '__version__', None) or _dist_version('torchvision')}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if note:
        print("note:", note)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x_nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    worst, failed = 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        for key in ([args.only] if args.only else list(CASES)):
            case = CASES[key]
            t0 = time.perf_counter()
            model, feats_fn = build_original(key, torch, timm, tvm)
            st, pth = save_formats(torch, model, tmp, key)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = feats_fn(x).numpy()
            t_ref = time.perf_counter() - t0
            print(f"\n{case['title']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
                  f"features {ref.shape}; built + saved in {t_build:.1f} s, original forward {t_ref:.2f} s")
            loaded = {}
            for path in (st, pth):
                fmt = os.path.splitext(path)[1]
                got, t_load, t_fwd = clax_features(case["clax"], case["settings"], path, x_nhwc)
                loaded[fmt] = got
                c = compare(ref, got)
                ok = c["rel_to_scale"] <= args.tol
                worst = max(worst, c["rel_to_scale"])
                if not ok:
                    failed.append(f"{key}{fmt}")
                print(f"  {fmt:<13} max abs {c['max_abs']:.3e}  scale {c['scale']:.3e}  "
                      f"max rel (abs/scale) {c['rel_to_scale']:.3e}  rel L2 {c['rel_l2']:.3e}  "
                      f"load {t_load:.1f} s  clax forward (incl. compile) {t_fwd:.1f} s  "
                      f"{'ok' if ok else 'ABOVE TOLERANCE'}")
            same = np.array_equal(loaded[".safetensors"], loaded[".pth"])
            print(f"  .safetensors and .pth give identical clax features: {same}")
            if not same:
                failed.append(f"{key}: formats differ")
            del model
    print(f"\nworst max abs diff / feature scale: {worst:.3e} (tolerance {args.tol:g})")
    if failed:
        print("FAILED:", ", ".join(failed))
        return 1
    return 0


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
