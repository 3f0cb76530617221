"""Pretrained import: checkpoints with random weights, written by the test in each real format (npz keys of
google-research/vision_transformer, timm and torchvision state-dict names and shapes, the CLIP image
tower), load into clax and give the features of an independent reference forward (numpy, or torch for
the ResNet) on the same input, to 1e-4."""
import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from clax.models import get_backbone
from clax.models.pretrained import checkpoint_kind

D, HEADS, DEPTH, P, IMG, MLP = 16, 2, 2, 4, 8, 32  # tiny ViT: 8x8 images, 4x4 patches, 5 tokens
rng = np.random.default_rng(0)


def r(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def save_safetensors(sd, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    return path


# ----- numpy references, written in each checkpoint's own layout -----

def ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def softmax(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def patches_chw(x, p):
    """[B, H, W, C] -> [B, N, C*p*p] in torch's (c, kh, kw) order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def attention_torch_layout(x, w_qkv, b_qkv, w_o, b_o, heads):
    b, n, d = x.shape
    qkv = (x @ w_qkv.T + b_qkv).reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads))
    return np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, d) @ w_o.T + b_o


def ref_timm(sd, x):
    t = patches_chw(x, P) @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    t = np.concatenate([np.broadcast_to(sd["cls_token"], (x.shape[0], 1, D)), t], 1) + sd["pos_embed"]
    for i in range(DEPTH):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = ln(t, g("norm1.weight"), g("norm1.bias"), 1e-6)
        t = t + attention_torch_layout(h, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                                       g("attn.proj.bias"), HEADS)
        h = ln(t, g("norm2.weight"), g("norm2.bias"), 1e-6)
        t = t + gelu(h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    return ln(t, sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 0]


def ref_clip(sd, x):
    v = "visual."
    t = patches_chw(x, P) @ sd[v + "conv1.weight"].reshape(D, -1).T
    cls = np.broadcast_to(sd[v + "class_embedding"], (x.shape[0], 1, D))
    t = np.concatenate([cls, t], 1) + sd[v + "positional_embedding"]
    t = ln(t, sd[v + "ln_pre.weight"], sd[v + "ln_pre.bias"], 1e-5)
    for i in range(DEPTH):
        g = lambda n: sd[f"{v}transformer.resblocks.{i}.{n}"]  # noqa: E731
        h = ln(t, g("ln_1.weight"), g("ln_1.bias"), 1e-5)
        t = t + attention_torch_layout(h, g("attn.in_proj_weight"), g("attn.in_proj_bias"),
                                       g("attn.out_proj.weight"), g("attn.out_proj.bias"), HEADS)
        h = ln(t, g("ln_2.weight"), g("ln_2.bias"), 1e-5) @ g("mlp.c_fc.weight").T + g("mlp.c_fc.bias")
        t = t + (h / (1 + np.exp(-1.702 * h))) @ g("mlp.c_proj.weight").T + g("mlp.c_proj.bias")
    return ln(t[:, 0], sd[v + "ln_post.weight"], sd[v + "ln_post.bias"], 1e-5)


def ref_npz(sd, x):
    b = x.shape[0]
    pt = x.reshape(b, IMG // P, P, IMG // P, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, P * P * 3)
    t = pt @ sd["embedding/kernel"].reshape(-1, D) + sd["embedding/bias"]
    t = np.concatenate([np.broadcast_to(sd["cls"], (b, 1, D)), t], 1) + sd["Transformer/posembed_input/pos_embedding"]
    for i in range(DEPTH):
        g = lambda n: sd[f"Transformer/encoderblock_{i}/{n}"]  # noqa: E731
        a = "MultiHeadDotProductAttention_1"
        h = ln(t, g("LayerNorm_0/scale"), g("LayerNorm_0/bias"), 1e-6)
        q, k, v = (np.einsum("bnd,dhk->bnhk", h, g(f"{a}/{n}/kernel")) + g(f"{a}/{n}/bias")
                   for n in ("query", "key", "value"))
        w = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS))
        t = t + np.einsum("bqhd,hdo->bqo", np.einsum("bhqk,bkhd->bqhd", w, v), g(f"{a}/out/kernel")) + g(f"{a}/out/bias")
        h = ln(t, g("LayerNorm_2/scale"), g("LayerNorm_2/bias"), 1e-6)
        h = gelu(h @ g("MlpBlock_3/Dense_0/kernel") + g("MlpBlock_3/Dense_0/bias"))
        t = t + h @ g("MlpBlock_3/Dense_1/kernel") + g("MlpBlock_3/Dense_1/bias")
    return ln(t, sd["Transformer/encoder_norm/scale"], sd["Transformer/encoder_norm/bias"], 1e-6)[:, 0]


# ----- checkpoints in the real layouts -----

def timm_state_dict(tokens=5, dim=D, depth=DEPTH, patch=P, mlp=MLP):
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, tokens, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch),
          "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim),
          "head.weight": r(10, dim), "head.bias": r(10)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
               b + "attn.qkv.bias": r(3 * dim), b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
               b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim), b + "mlp.fc1.weight": r(mlp, dim),
               b + "mlp.fc1.bias": r(mlp), b + "mlp.fc2.weight": r(dim, mlp), b + "mlp.fc2.bias": r(dim)}
    return sd


def clip_state_dict():
    v = "visual."
    sd = {v + "conv1.weight": r(D, 3, P, P), v + "class_embedding": r(D), v + "positional_embedding": r(5, D),
          v + "ln_pre.weight": 1 + r(D), v + "ln_pre.bias": r(D), v + "ln_post.weight": 1 + r(D),
          v + "ln_post.bias": r(D), v + "proj": r(D, 8), "logit_scale": np.float32(4.6).reshape(())}
    for i in range(DEPTH):
        b = f"{v}transformer.resblocks.{i}."
        sd |= {b + "ln_1.weight": 1 + r(D), b + "ln_1.bias": r(D), b + "attn.in_proj_weight": r(3 * D, D),
               b + "attn.in_proj_bias": r(3 * D), b + "attn.out_proj.weight": r(D, D), b + "attn.out_proj.bias": r(D),
               b + "ln_2.weight": 1 + r(D), b + "ln_2.bias": r(D), b + "mlp.c_fc.weight": r(MLP, D),
               b + "mlp.c_fc.bias": r(MLP), b + "mlp.c_proj.weight": r(D, MLP), b + "mlp.c_proj.bias": r(D)}
    return sd


def npz_dict():
    hd = D // HEADS
    sd = {"embedding/kernel": r(P, P, 3, D), "embedding/bias": r(D), "cls": r(1, 1, D),
          "Transformer/posembed_input/pos_embedding": r(1, 5, D), "Transformer/encoder_norm/scale": 1 + r(D),
          "Transformer/encoder_norm/bias": r(D), "head/kernel": r(D, 10), "head/bias": r(10)}
    for i in range(DEPTH):
        b, a = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        sd |= {b + "LayerNorm_0/scale": 1 + r(D), b + "LayerNorm_0/bias": r(D), b + "LayerNorm_2/scale": 1 + r(D),
               b + "LayerNorm_2/bias": r(D), b + "MlpBlock_3/Dense_0/kernel": r(D, MLP),
               b + "MlpBlock_3/Dense_0/bias": r(MLP), b + "MlpBlock_3/Dense_1/kernel": r(MLP, D),
               b + "MlpBlock_3/Dense_1/bias": r(D), a + "out/kernel": r(HEADS, hd, D), a + "out/bias": r(D)}
        for n in ("query", "key", "value"):
            sd |= {a + f"{n}/kernel": r(D, HEADS, hd), a + f"{n}/bias": r(HEADS, hd)}
    return sd


def torchvision_resnet18_state_dict(nf):
    sd = {}

    def conv(name, o, i, k):
        sd[name + ".weight"] = r(o, i, k, k, scale=(2 / (i * k * k)) ** 0.5)

    def bn(name, c):
        sd.update({name + ".weight": 1 + r(c, scale=0.1), name + ".bias": r(c, scale=0.1),
                   name + ".running_mean": r(c, scale=0.1),
                   name + ".running_var": (0.5 + rng.random(c)).astype(np.float32),
                   name + ".num_batches_tracked": np.asarray(7, np.int64)})

    conv("conv1", nf, 3, 7), bn("bn1", nf)
    cin = nf
    for s, w in enumerate([nf, 2 * nf, 4 * nf, 8 * nf], 1):
        for j in range(2):
            b = f"layer{s}.{j}"
            conv(b + ".conv1", w, cin if j == 0 else w, 3), bn(b + ".bn1", w)
            conv(b + ".conv2", w, w, 3), bn(b + ".bn2", w)
            if j == 0 and s > 1:
                conv(b + ".downsample.0", w, cin, 1), bn(b + ".downsample.1", w)
        cin = w
    sd |= {"fc.weight": r(10, 8 * nf), "fc.bias": r(10)}
    return sd


def ref_resnet_torch(sd, x):
    torch = pytest.importorskip("torch", reason="the ResNet reference forward is torch's conv2d/batch_norm")
    F = torch.nn.functional
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

    def bn(h, n):
        return F.batch_norm(h, t[n + ".running_mean"], t[n + ".running_var"], t[n + ".weight"], t[n + ".bias"],
                            False, 0.0, 1e-5)

    h = torch.from_numpy(x).permute(0, 3, 1, 2)
    h = F.max_pool2d(F.relu(bn(F.conv2d(h, t["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for s in range(1, 5):
        for j in range(2):
            b, stride = f"layer{s}.{j}", 2 if (s > 1 and j == 0) else 1
            y = F.relu(bn(F.conv2d(h, t[b + ".conv1.weight"], stride=stride, padding=1), b + ".bn1"))
            y = bn(F.conv2d(y, t[b + ".conv2.weight"], padding=1), b + ".bn2")
            if b + ".downsample.0.weight" in t:
                h = bn(F.conv2d(h, t[b + ".downsample.0.weight"], stride=stride), b + ".downsample.1")
            h = F.relu(h + y)
    return h.mean((2, 3)).numpy()


# ----- a checkpoint's own values, found by name in the file (independent of clax's converters) -----

def torch_name(path: str) -> str:
    """The timm / torchvision state-dict key of clax parameter ``path`` (``"/"``-joined)."""
    *mods, leaf = path.removeprefix("resnet/").split("/")
    mods = [re.sub(r"^(blocks|layer\d)_(\d+)$", r"\1.\2", m) for m in mods]
    mods = [{"downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
             "patch_embed": "patch_embed.proj"}.get(m, m) for m in mods]
    leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    return ".".join(mods + [leaf])


def checkpoint_value(sd: dict, path: str) -> np.ndarray:
    """The file's array for clax parameter ``path``, in clax's layout (conv [kh, kw, in, out], dense [in, out])."""
    a = np.asarray(sd[torch_name(path)])
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    return a.T if path.endswith("kernel") and a.ndim == 2 else a


def assert_is_checkpoint(tree, sd: dict) -> None:
    """Every float32 leaf of ``tree`` (nested dicts; keys may be ``"."``-joined paths) is bit for bit the
    file's value."""
    flat = {"/".join(k).replace(".", "/"): v for k, v in flatten_dict(tree).items()}
    assert flat
    for path, leaf in flat.items():
        got, want = np.asarray(leaf), checkpoint_value(sd, path)
        assert got.dtype == np.float32 and got.shape == want.shape, (path, got.dtype, got.shape, want.shape)
        np.testing.assert_array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32), err_msg=path)


def as_state_dict(*trees) -> dict:
    """clax backbone trees (params, batch_stats) written under timm / torchvision names and layouts (the
    inverse of :func:`checkpoint_value`): a checkpoint file in the real format with chosen values."""
    sd = {}
    for tree in trees:
        for k, v in flatten_dict(tree).items():
            path, a = "/".join(k), np.asarray(v)
            if a.ndim == 4:
                a = a.transpose(3, 2, 0, 1)
            elif path.endswith("kernel") and a.ndim == 2:
                a = a.T
            sd[torch_name(path)] = np.ascontiguousarray(a)
    return sd


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def features(bb, x):
    params, stats = bb.init(jax.random.PRNGKey(1))
    return np.asarray(bb.apply(params, stats, jnp.asarray(x), False)[0])


VIT = dict(patch=P, dim=D, depth=DEPTH, heads=HEADS, mlp_ratio=MLP / D)


@pytest.fixture(scope="module")
def x_vit():
    return np.random.default_rng(1).standard_normal((3, IMG, IMG, 3)).astype(np.float32)


def test_timm_vit_safetensors_matches_reference(tmp_path, x_vit):
    sd = timm_state_dict()
    path = save_safetensors(sd, str(tmp_path / "vit.safetensors"))
    assert checkpoint_kind(path) == "timm_vit"
    bb = get_backbone("vit", (IMG, IMG, 3), **VIT, pretrained=path)
    assert_is_checkpoint(bb.init(jax.random.PRNGKey(0))[0], sd)
    got = features(bb, x_vit)
    np.testing.assert_allclose(got, ref_timm(sd, x_vit), atol=1e-4, rtol=1e-4)


def test_vision_transformer_npz_matches_reference(tmp_path, x_vit):
    sd = npz_dict()
    path = str(tmp_path / "ViT-tiny.npz")
    np.savez(path, **sd)
    assert checkpoint_kind(path) == "vit_npz"
    got = features(get_backbone("vit", (IMG, IMG, 3), **VIT, pretrained=path), x_vit)
    np.testing.assert_allclose(got, ref_npz(sd, x_vit), atol=1e-4, rtol=1e-4)


def test_clip_image_tower_matches_reference(tmp_path, x_vit):
    sd = clip_state_dict()
    path = save_safetensors(sd, str(tmp_path / "open_clip_model.safetensors"))
    assert checkpoint_kind(path) == "clip"
    bb = get_backbone("vit", (IMG, IMG, 3), **VIT, pretrained=path)
    assert bb.module.act == "quick_gelu" and bb.module.ln_pre and not bb.module.patch_bias
    np.testing.assert_allclose(features(bb, x_vit), ref_clip(sd, x_vit), atol=1e-4, rtol=1e-4)


def test_torchvision_resnet18_safetensors_matches_torch(tmp_path):
    sd = torchvision_resnet18_state_dict(nf=4)
    path = save_safetensors(sd, str(tmp_path / "resnet18.safetensors"))
    x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    bb = get_backbone("resnet18", (32, 32, 3), nf=4, stem="imagenet", pretrained=path)
    params, stats = bb.init(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(stats["resnet"]["bn1"]["var"]), sd["bn1.running_var"])
    assert_is_checkpoint(params, sd), assert_is_checkpoint(stats, sd)  # the helper the methods' tests use
    assert bb.pretrained == path and bb.pretrained_sha256 == file_sha256(path)
    np.testing.assert_allclose(features(bb, x), ref_resnet_torch(sd, x), atol=1e-4, rtol=1e-4)


def test_pth_state_dicts_load_with_weights_only(tmp_path, x_vit):
    torch = pytest.importorskip("torch", reason=".pth checkpoints are read with torch.load(weights_only=True)")
    sd = timm_state_dict()
    path = str(tmp_path / "vit.pth")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    got = features(get_backbone("vit", (IMG, IMG, 3), **VIT, pretrained=path), x_vit)
    np.testing.assert_allclose(got, ref_timm(sd, x_vit), atol=1e-4, rtol=1e-4)


def test_mismatched_checkpoint_names_the_first_mismatching_parameter(tmp_path):
    # a 224-style position table (17 tokens for 16x16 images) against a backbone built for 8x8 images
    path = save_safetensors(timm_state_dict(tokens=17), str(tmp_path / "vit224.safetensors"))
    with pytest.raises(ValueError, match=r"first mismatching parameter 'pos_embed' \(checkpoint 'pos_embed'\) "
                                         r"has shape \(1, 17, 16\); the backbone expects \(1, 5, 16\)"):
        get_backbone("vit", (IMG, IMG, 3), **VIT, pretrained=path)
    # a ResNet of another width: the stem conv is the first parameter to differ
    path = save_safetensors(torchvision_resnet18_state_dict(nf=8), str(tmp_path / "r18.safetensors"))
    with pytest.raises(ValueError, match=r"first mismatching parameter 'resnet/conv1/kernel' \(checkpoint "
                                         r"'conv1.weight'\) has shape \(7, 7, 3, 8\)"):
        get_backbone("resnet18", (32, 32, 3), nf=4, stem="imagenet", pretrained=path)
    # the CIFAR stem is 3x3: an ImageNet checkpoint does not fit it
    with pytest.raises(ValueError, match="resnet/conv1/kernel"):
        get_backbone("resnet18", (32, 32, 3), nf=8, pretrained=path)
    with pytest.raises(ValueError, match="does not exist"):
        get_backbone("vit", (IMG, IMG, 3), **VIT, pretrained=os.path.join(str(tmp_path), "nope.npz"))


def test_pretraining_compiles_the_init_where_it_equals_the_eager_one():
    """clax.pretrain._init jits the backbones' init (one program instead of a draw per weight shape)
    because it is bit for bit the eager init, which the pretrained weights came from: the ResNets and
    the ViT (whose pos_embed draw keeps its scaling apart, else XLA folds the constants)."""
    import jax
    import numpy as np

    from clax import pretrain
    from clax.models import get_backbone

    key = jax.random.PRNGKey(3)
    for stem in ("cifar", "imagenet"):
        bb = get_backbone("resnet18", (32, 32, 3), nf=2, stem=stem)
        jax.tree.map(np.testing.assert_array_equal, pretrain._init(bb)(key), bb.init(key))
    vit = get_backbone("vit", (32, 32, 3), patch=8, dim=16, depth=1, heads=2, mlp_ratio=2.0)
    jax.tree.map(np.testing.assert_array_equal, pretrain._init(vit)(key), vit.init(key))


def test_inits_compiled_at_level_1_give_the_default_levels_bits():
    """clax.models.jit_init compiles an init at LLVM level 1 on the CPU (faster to compile): the values
    are those of a plain jax.jit (level 2), bit for bit, for the methods' inits (heads, hypernetworks,
    prototypes) and the MLP backbone (the ResNets' and the ViT's: the test above). A chain's init is
    compiled as two programs, the model's and the transforms' (``init.stages``): the same values too."""
    import jax
    import numpy as np

    from clax.data import split_digits
    from clax.methods import get_method
    from clax.models import INIT_CPU_OPTIONS, get_backbone, jit_init
    from clax.train import make_context

    assert jax.default_backend() != "cpu" or INIT_CPU_OPTIONS == {"xla_backend_optimization_level": 1}
    bench = split_digits(0)
    key = jax.random.PRNGKey(5)
    for name, scenario in (("finetune", "cil"), ("hnet", "til"), ("pah", "til"), ("ewc", "til"), ("hembed", "til")):
        ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[32]), bench, scenario)
        init = get_method(name, ctx).init
        assert len(init.stages) == 2  # a chain's: compiled apart
        jax.tree.map(np.testing.assert_array_equal, jit_init(init)(key), jax.jit(init)(key))


def test_a_hypernetwork_layout_reads_the_eager_inits_values():
    """``hypernet.layout`` initialises its target once, compiled (``jit_init``): the per-leaf shift and
    scale are those of the eager init's values, bit for bit (the MLP target of hnet and hembed; a
    ResNet-18 nf=8 target was checked once)."""
    import jax
    import numpy as np

    from clax.data import split_digits
    from clax.models import get_backbone
    from clax.transforms import hypernet as H
    from clax.transforms.classifier import init_head

    bb = get_backbone("mlp", split_digits(0).input_shape, hidden=[32])

    def target_init(key):
        kb, kh = jax.random.split(key)
        return {"backbone": bb.init(kb)[0], "head": init_head(kh, bb.feature_dim, 2)}

    key = jax.random.PRNGKey(0)
    lay = H.layout(target_init, key=key)
    vals = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(target_init(key))]  # eager
    assert lay.shift == tuple(float(v.mean()) for v in vals)
    assert lay.scale == tuple(float(v.std()) if v.std() > 1e-8 else 0.1 for v in vals)


def test_the_h_embedding_decoder_init_compiled_gives_the_eager_values():
    """hembed draws a fresh decoder at each task's start by one compiled program (``jit_init``): the
    values of the eager draws, bit for bit (PyTorch ``nn.Linear``'s uniform bounds)."""
    import jax
    import numpy as np

    from clax.models import jit_init
    from clax.transforms.h_embedding import decoder_init

    sizes = (96, 512, 32)
    key = jax.random.PRNGKey(3)
    jax.tree.map(np.testing.assert_array_equal, jit_init(lambda k: decoder_init(k, sizes))(key),
                 decoder_init(key, sizes))
