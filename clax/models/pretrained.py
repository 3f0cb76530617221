"""Pretrained checkpoints into clax's own parameter trees.

Formats (the layout is recognised from the file's keys, see :func:`checkpoint_kind`):

* ``vit_npz``: google-research/vision_transformer ``.npz`` (augreg and the original ViT releases):
  ``embedding/kernel``, ``cls``, ``Transformer/posembed_input/pos_embedding``,
  ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
  LayerNorm_2, MlpBlock_3/Dense_{0,1}}``, ``Transformer/encoder_norm``.
* ``timm_vit``: a timm ViT state dict (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
  ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``).
* ``clip``: the CLIP image tower in the OpenAI / open_clip layout (``visual.conv1``,
  ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``,
  ``visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
  ``visual.ln_post``); features are ``ln_post`` of the class token, before ``visual.proj``.
* ``torchvision_resnet``: a torchvision ResNet state dict (``conv1``, ``bn1``, ``layer{s}.{b}.conv1``,
  ``...downsample.0/1``), BatchNorm running statistics included.

State dicts are read from ``.safetensors`` (the ``safetensors`` package, numpy only) or, where torch is
installed, ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)`` (never unpickled
otherwise). Classifier heads (``head``, ``fc``, ``visual.proj``) are not part of a backbone and are
skipped. :func:`load_into` checks every converted array against the backbone's own shapes and names
the first mismatching parameter.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import numpy as np

PyTree = Any

#: Module settings that a checkpoint kind implies for the clax ViT (CLIP differs from timm).
VIT_OVERRIDES = {"clip": {"eps": 1e-5, "act": "quick_gelu", "ln_pre": True, "patch_bias": False}}


def file_sha256(path: str) -> str:
    """The SHA-256 (hex) of the bytes of the file at ``path`` (read in 1 MiB blocks).

    Raises:
      ValueError: there is no such file.
    """
    if not os.path.isfile(path):
        raise ValueError(f"pretrained checkpoint {path} does not exist")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The flat ``{name: array}`` of a ``.npz``, ``.safetensors`` or (with torch) ``.pth/.pt/.bin`` file."""
    if not os.path.isfile(path):
        raise ValueError(f"pretrained checkpoint {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if ext in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise ValueError(f"reading {path} needs torch (pip install torch), or convert it to .safetensors") from None
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
        return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in sd.items() if hasattr(v, "numpy")}
    raise ValueError(f"unknown checkpoint format {ext!r} of {path}; valid: .npz, .safetensors, .pth, .pt, .bin")


def kind_of(sd: dict) -> str:
    """The layout of a flat checkpoint: ``vit_npz``, ``timm_vit``, ``clip`` or ``torchvision_resnet``."""
    keys = set(sd)
    if "embedding/kernel" in keys or any(k.startswith("Transformer/") for k in keys):
        return "vit_npz"
    if any(k.startswith("visual.") for k in keys) or "class_embedding" in keys:
        return "clip"
    if "patch_embed.proj.weight" in keys or "cls_token" in keys:
        return "timm_vit"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision_resnet"
    raise ValueError("unrecognised checkpoint layout (first keys: "
                     f"{sorted(keys)[:5]}); expected a vision_transformer .npz, a timm ViT, a CLIP image "
                     "tower or a torchvision ResNet state dict")


def checkpoint_kind(path: str) -> str:
    """:func:`kind_of` the checkpoint at ``path``."""
    return kind_of(read_checkpoint(path))


def _t(w):  # torch Linear [out, in] -> flax Dense [in, out]
    return np.ascontiguousarray(np.asarray(w).T)


def _conv(w):  # torch Conv [O, I, kh, kw] -> flax Conv [kh, kw, I, O]
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def _ln(sd, name, scale="weight", bias="bias"):
    return {"scale": sd[f"{name}.{scale}"], "bias": sd[f"{name}.{bias}"]}


def _depth(sd, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def vit_from_npz(sd: dict) -> dict:
    """clax ViT params (with ``src``: clax path -> npz key) from a vision_transformer ``.npz``."""
    src = {}

    def g(key, path):
        src[path] = key
        if key not in sd:
            raise ValueError(f"vision_transformer checkpoint has no {key!r} (needed for {path})")
        return np.asarray(sd[key])

    p = {"patch_embed": {"kernel": g("embedding/kernel", "patch_embed/kernel"),
                         "bias": g("embedding/bias", "patch_embed/bias")},
         "cls_token": g("cls", "cls_token"),
         "pos_embed": g("Transformer/posembed_input/pos_embedding", "pos_embed")}
    for i in range(_depth(sd, r"Transformer/encoderblock_(\d+)/")):
        b, c = f"Transformer/encoderblock_{i}", f"blocks_{i}"
        att = f"{b}/MultiHeadDotProductAttention_1"
        # query/key/value kernels are [D, heads, head_dim]; clax's fused qkv is [D, 3 * heads * head_dim].
        qkv_k = np.concatenate([g(f"{att}/{n}/kernel", f"{c}/attn/qkv/kernel").reshape(
            sd[f"{att}/{n}/kernel"].shape[0], -1) for n in ("query", "key", "value")], axis=1)
        qkv_b = np.concatenate([g(f"{att}/{n}/bias", f"{c}/attn/qkv/bias").reshape(-1)
                                for n in ("query", "key", "value")])
        out_k = g(f"{att}/out/kernel", f"{c}/attn/proj/kernel")
        p[c] = {
            "norm1": {"scale": g(f"{b}/LayerNorm_0/scale", f"{c}/norm1/scale"),
                      "bias": g(f"{b}/LayerNorm_0/bias", f"{c}/norm1/bias")},
            "attn": {"qkv": {"kernel": qkv_k, "bias": qkv_b},
                     "proj": {"kernel": out_k.reshape(-1, out_k.shape[-1]),
                              "bias": g(f"{att}/out/bias", f"{c}/attn/proj/bias")}},
            "norm2": {"scale": g(f"{b}/LayerNorm_2/scale", f"{c}/norm2/scale"),
                      "bias": g(f"{b}/LayerNorm_2/bias", f"{c}/norm2/bias")},
            "mlp": {"fc1": {"kernel": g(f"{b}/MlpBlock_3/Dense_0/kernel", f"{c}/mlp/fc1/kernel"),
                            "bias": g(f"{b}/MlpBlock_3/Dense_0/bias", f"{c}/mlp/fc1/bias")},
                    "fc2": {"kernel": g(f"{b}/MlpBlock_3/Dense_1/kernel", f"{c}/mlp/fc2/kernel"),
                            "bias": g(f"{b}/MlpBlock_3/Dense_1/bias", f"{c}/mlp/fc2/bias")}},
        }
    p["norm"] = {"scale": g("Transformer/encoder_norm/scale", "norm/scale"),
                 "bias": g("Transformer/encoder_norm/bias", "norm/bias")}
    return {"params": p, "batch_stats": {}, "src": src}


def vit_from_timm(sd: dict) -> dict:
    """clax ViT params from a timm ViT state dict (class token pooling, no ``fc_norm``)."""
    if "fc_norm.weight" in sd:
        raise ValueError("timm checkpoint uses average pooling (fc_norm); clax's ViT pools the class token")
    src = {"patch_embed/kernel": "patch_embed.proj.weight", "patch_embed/bias": "patch_embed.proj.bias",
           "cls_token": "cls_token", "pos_embed": "pos_embed"}
    p = {"patch_embed": {"kernel": _conv(sd["patch_embed.proj.weight"]), "bias": sd["patch_embed.proj.bias"]},
         "cls_token": sd["cls_token"], "pos_embed": sd["pos_embed"]}
    for i in range(_depth(sd, r"blocks\.(\d+)\.")):
        b, c = f"blocks.{i}", f"blocks_{i}"
        p[c] = {"norm1": _ln(sd, f"{b}.norm1"), "norm2": _ln(sd, f"{b}.norm2"),
                "attn": {"qkv": {"kernel": _t(sd[f"{b}.attn.qkv.weight"]), "bias": sd[f"{b}.attn.qkv.bias"]},
                         "proj": {"kernel": _t(sd[f"{b}.attn.proj.weight"]), "bias": sd[f"{b}.attn.proj.bias"]}},
                "mlp": {"fc1": {"kernel": _t(sd[f"{b}.mlp.fc1.weight"]), "bias": sd[f"{b}.mlp.fc1.bias"]},
                        "fc2": {"kernel": _t(sd[f"{b}.mlp.fc2.weight"]), "bias": sd[f"{b}.mlp.fc2.bias"]}}}
        for clax_name, torch_name in (("norm1", "norm1"), ("norm2", "norm2"), ("attn/qkv", "attn.qkv"),
                                      ("attn/proj", "attn.proj"), ("mlp/fc1", "mlp.fc1"), ("mlp/fc2", "mlp.fc2")):
            w = "scale" if clax_name.startswith("norm") else "kernel"
            src[f"{c}/{clax_name}/{w}"] = f"{b}.{torch_name}.weight"
            src[f"{c}/{clax_name}/bias"] = f"{b}.{torch_name}.bias"
    p["norm"] = _ln(sd, "norm")
    src.update({"norm/scale": "norm.weight", "norm/bias": "norm.bias"})
    return {"params": p, "batch_stats": {}, "src": src}


def vit_from_clip(sd: dict) -> dict:
    """clax ViT params (CLIP flavour, see ``VIT_OVERRIDES``) from a CLIP image tower state dict."""
    v = "visual." if any(k.startswith("visual.") for k in sd) else ""
    src = {"patch_embed/kernel": f"{v}conv1.weight", "cls_token": f"{v}class_embedding",
           "pos_embed": f"{v}positional_embedding", "norm_pre/scale": f"{v}ln_pre.weight",
           "norm_pre/bias": f"{v}ln_pre.bias"}
    cls, pos = np.asarray(sd[f"{v}class_embedding"]), np.asarray(sd[f"{v}positional_embedding"])
    p = {"patch_embed": {"kernel": _conv(sd[f"{v}conv1.weight"])},
         "cls_token": cls.reshape(1, 1, -1), "pos_embed": pos.reshape((1,) + pos.shape[-2:]),
         "norm_pre": _ln(sd, f"{v}ln_pre")}
    for i in range(_depth(sd, rf"{re.escape(v)}transformer\.resblocks\.(\d+)\.")):
        b, c = f"{v}transformer.resblocks.{i}", f"blocks_{i}"
        p[c] = {"norm1": _ln(sd, f"{b}.ln_1"), "norm2": _ln(sd, f"{b}.ln_2"),
                "attn": {"qkv": {"kernel": _t(sd[f"{b}.attn.in_proj_weight"]), "bias": sd[f"{b}.attn.in_proj_bias"]},
                         "proj": {"kernel": _t(sd[f"{b}.attn.out_proj.weight"]),
                                  "bias": sd[f"{b}.attn.out_proj.bias"]}},
                "mlp": {"fc1": {"kernel": _t(sd[f"{b}.mlp.c_fc.weight"]), "bias": sd[f"{b}.mlp.c_fc.bias"]},
                        "fc2": {"kernel": _t(sd[f"{b}.mlp.c_proj.weight"]), "bias": sd[f"{b}.mlp.c_proj.bias"]}}}
        for clax_name, torch_w, torch_b in (("norm1", "ln_1.weight", "ln_1.bias"), ("norm2", "ln_2.weight", "ln_2.bias"),
                                            ("attn/qkv", "attn.in_proj_weight", "attn.in_proj_bias"),
                                            ("attn/proj", "attn.out_proj.weight", "attn.out_proj.bias"),
                                            ("mlp/fc1", "mlp.c_fc.weight", "mlp.c_fc.bias"),
                                            ("mlp/fc2", "mlp.c_proj.weight", "mlp.c_proj.bias")):
            w = "scale" if clax_name.startswith("norm") else "kernel"
            src[f"{c}/{clax_name}/{w}"], src[f"{c}/{clax_name}/bias"] = f"{b}.{torch_w}", f"{b}.{torch_b}"
    p["norm"] = _ln(sd, f"{v}ln_post")
    src.update({"norm/scale": f"{v}ln_post.weight", "norm/bias": f"{v}ln_post.bias"})
    return {"params": p, "batch_stats": {}, "src": src}


def resnet_from_torchvision(sd: dict) -> dict:
    """clax ResNet params and BatchNorm statistics from a torchvision ResNet state dict."""
    params, stats, src = {}, {}, {}

    def conv(t_name, c_path):
        params[c_path] = {"kernel": _conv(sd[f"{t_name}.weight"])}
        src[f"{c_path}/kernel"] = f"{t_name}.weight"

    def bn(t_name, c_path):
        params[c_path] = {"scale": sd[f"{t_name}.weight"], "bias": sd[f"{t_name}.bias"]}
        stats[c_path] = {"mean": sd[f"{t_name}.running_mean"], "var": sd[f"{t_name}.running_var"]}
        for a, b in (("scale", "weight"), ("bias", "bias")):
            src[f"{c_path}/{a}"] = f"{t_name}.{b}"
        for a, b in (("mean", "running_mean"), ("var", "running_var")):
            src[f"batch_stats:{c_path}/{a}"] = f"{t_name}.{b}"

    conv("conv1", "resnet/conv1")
    bn("bn1", "resnet/bn1")
    for s in range(1, 5):
        for j in range(_depth(sd, rf"layer{s}\.(\d+)\.")):
            t, c = f"layer{s}.{j}", f"resnet/layer{s}_{j}"
            if f"{t}.conv3.weight" in sd:
                raise ValueError(f"{t} is a bottleneck block (ResNet-50 and deeper); clax has basic-block ResNets")
            conv(f"{t}.conv1", f"{c}/conv1"), bn(f"{t}.bn1", f"{c}/bn1")
            conv(f"{t}.conv2", f"{c}/conv2"), bn(f"{t}.bn2", f"{c}/bn2")
            if f"{t}.downsample.0.weight" in sd:
                conv(f"{t}.downsample.0", f"{c}/downsample_conv"), bn(f"{t}.downsample.1", f"{c}/downsample_bn")
    return {"params": _nest(params), "batch_stats": _nest(stats), "src": src}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _flatten(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


CONVERTERS = {"vit_npz": vit_from_npz, "timm_vit": vit_from_timm, "clip": vit_from_clip,
              "torchvision_resnet": resnet_from_torchvision}


def convert(sd: dict) -> dict:
    """``{"params", "batch_stats", "src", "kind"}`` of a flat checkpoint (see :data:`CONVERTERS`)."""
    kind = kind_of(sd)
    try:
        out = CONVERTERS[kind](sd)
    except KeyError as e:
        raise ValueError(f"{kind} checkpoint is missing {e.args[0]!r}") from None
    out["kind"] = kind
    return out


def load_into(path: str, params: PyTree, batch_stats: PyTree) -> tuple[PyTree, PyTree]:
    """The checkpoint at ``path`` as ``(params, batch_stats)`` shaped like the given trees.

    Every leaf of ``params``/``batch_stats`` (the backbone's own, e.g. from ``init`` or ``eval_shape``)
    must be in the checkpoint with the same shape; the first one (in the backbone's order) that is
    missing or differs is named in a ValueError together with its checkpoint key and both shapes.
    Checkpoint arrays that the backbone does not have (classifier heads) are ignored.
    """
    import jax.numpy as jnp

    conv = convert(read_checkpoint(path))
    out = []
    for part, template, got in (("params", params, conv["params"]), ("batch_stats", batch_stats, conv["batch_stats"])):
        flat_t, flat_g = _flatten(dict(template)), _flatten(got)
        tag = "" if part == "params" else "batch_stats:"
        order = {k: i for i, k in enumerate(conv["src"])}  # the checkpoint's (forward) order
        loaded = {}
        for name, leaf in sorted(flat_t.items(), key=lambda kv: order.get(tag + kv[0], len(order))):
            key = conv["src"].get(tag + name, "?")
            if name not in flat_g:
                raise ValueError(f"pretrained {path} ({conv['kind']}): backbone {part} {name!r} of shape "
                                 f"{tuple(leaf.shape)} has no counterpart in the checkpoint (first missing parameter)")
            arr = np.asarray(flat_g[name])
            if tuple(arr.shape) != tuple(leaf.shape):
                raise ValueError(f"pretrained {path} ({conv['kind']}): first mismatching parameter {name!r} "
                                 f"(checkpoint {key!r}) has shape {tuple(arr.shape)}; the backbone expects "
                                 f"{tuple(leaf.shape)} (check the backbone settings: width, depth, patch, "
                                 f"image size, stem)")
            loaded[name] = jnp.asarray(arr, dtype=leaf.dtype)
        out.append(_nest(loaded) if loaded else {})
    return out[0], out[1]


def module_overrides(path: str) -> dict:
    """ViT module settings that the checkpoint at ``path`` implies (CLIP's eps, QuickGELU, ln_pre)."""
    return dict(VIT_OVERRIDES.get(checkpoint_kind(path), {}))
