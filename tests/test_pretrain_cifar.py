"""pretrained=cifar10: supervised pretraining of a frozen backbone on CIFAR-10 class folders (clax.pretrain),
cached like the glyph pretraining, reported (data, steps, held-out accuracy, source), chosen with the
frozen-backbone methods' ``pretrained`` setting and ``pretrain_data_dir``; its errors. A folder of a few
images written by the test, and the shared CIFAR-10 (skipped where ../shared is absent)."""
import json
import os
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image

from battery import quick_config
from clax import pretrain
from clax.cli import main
from clax.config import ConfigError
from clax.models import get_backbone
from clax.runner import build

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root, train=3, test=1, size=32) -> str:
    """CIFAR-10's class-folder layout: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg, one colour a class."""
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(CLASSES):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), (20 * c, 255 - 20 * c, 40 + 10 * i)).save(os.path.join(d, f"{i:04d}.jpg"))
    return str(root)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(autouse=True)
def fresh_memo():
    pretrain._MEMO.clear()  # each test sees the disk cache, not the process's memory
    yield
    pretrain._MEMO.clear()


def test_report_fields_and_the_cache_reused_then_rekeyed_by_the_folder_content(tmp_path, monkeypatch):
    data = write_cifar(tmp_path / "cifar")
    bb = get_backbone("mlp", (32 * 32 * 3,), hidden=[8])
    cache = tmp_path / "cache"
    p, s, rep = pretrain.pretrained_backbone(bb, "cifar10", steps=3, seed=0, cache_dir=str(cache), data_dir=data)
    assert rep["source"] == "cifar10" and rep["steps"] == 3 and rep["batch_size"] == 64
    assert (rep["train_samples"], rep["heldout_samples"], rep["classes"]) == (30, 10, CLASSES)
    assert rep["image_size"] == 32 and 0.0 <= rep["heldout_accuracy"] <= 1.0 and np.isfinite(rep["final_loss"])
    assert os.path.abspath(data) in rep["data"] and "held out: the test split" in rep["data"]
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and files[0].startswith("mlp-cifar10-") and files[0].endswith(".json")
    on_disk = json.loads((cache / files[0]).read_text())
    assert on_disk["source"] == "cifar10" and len(on_disk["weights_sha256"]) == 64
    # the same settings again: read from the cache, never trained
    monkeypatch.setattr(pretrain, "pretrain_cifar10", lambda *a, **k: pytest.fail("pretrained again"))
    pretrain._MEMO.clear()
    p2, s2, rep2 = pretrain.pretrained_backbone(bb, "cifar10", steps=3, seed=0, cache_dir=str(cache), data_dir=data)
    assert rep2["cached"] == str(cache / files[1]) and rep2["heldout_accuracy"] == rep["heldout_accuracy"]
    for a, b in zip(leaves(p), leaves(p2)):
        np.testing.assert_array_equal(a, b)
    # a copy of the folder elsewhere is the same data: the same cache entry
    subprocess.run(["cp", "-r", data, str(tmp_path / "copy")], check=True)
    pretrain._MEMO.clear()
    assert pretrain.pretrained_backbone(bb, "cifar10", steps=3, cache_dir=str(cache),
                                        data_dir=str(tmp_path / "copy"))[2]["cached"]
    # other steps, or other files, are another entry (pretraining runs: here it is refused)
    for kw, folder in (({"steps": 4}, data), ({"steps": 3}, str(tmp_path / "copy"))):
        if folder != data:
            Image.new("RGB", (32, 32)).save(os.path.join(folder, "train", "cat", "9999.jpg"))
        pretrain._MEMO.clear()
        with pytest.raises(BaseException, match="pretrained again"):
            pretrain.pretrained_backbone(bb, "cifar10", cache_dir=str(cache), data_dir=folder, **kw)
    assert pretrain.cache_key(bb, 3, 0) == pretrain.cache_key(bb, 3, 0, "glyphs")  # the glyph key is unchanged
    assert pretrain.cache_key(bb, 3, 0, "cifar10", "a").startswith("mlp-cifar10-") and \
        pretrain.cache_key(bb, 3, 0, "cifar10", "a") != pretrain.cache_key(bb, 3, 0, "cifar10", "b")


def test_a_damaged_cache_is_set_aside_and_rebuilt(tmp_path, capsys):
    data = write_cifar(tmp_path / "cifar", train=1)
    bb = get_backbone("mlp", (32 * 32 * 3,), hidden=[8])
    cache = tmp_path / "cache"
    pretrain.pretrained_backbone(bb, "cifar10", steps=1, cache_dir=str(cache), data_dir=data)
    weights = next(f for f in os.listdir(cache) if f.endswith(".msgpack"))
    (cache / weights).write_bytes(b"garbage")
    pretrain._MEMO.clear()
    _, _, rep = pretrain.pretrained_backbone(bb, "cifar10", steps=1, cache_dir=str(cache), data_dir=data)
    assert rep["source"] == "cifar10" and "cached" not in rep
    assert "does not match the SHA-256" in capsys.readouterr().err
    assert (cache / f"{weights}.damaged-1").read_bytes() == b"garbage"


def test_clr_and_a_small_vit_pretrain_on_cifar10_through_the_setting(tmp_path):
    """clr.pretrained=cifar10: a reduced ResNet-18 pretrained on the folder, its report in the method's;
    a small ViT at 32x32 (soft_tf's backbone) pretrains too."""
    data = write_cifar(tmp_path / "cifar", train=1)
    _, _, meth = build(quick_config("clr", sets=["backbone.nf=2", "clr.pretrained=cifar10", "clr.pretrain_steps=1",
                                                 f"clr.pretrain_data_dir={data}", f"clr.pretrain_dir={tmp_path / 'c'}"]))
    rep = meth.report(meth.init(jax.random.PRNGKey(0)))["pretrain"]
    assert rep["source"] == "cifar10" and rep["steps"] == 1 and rep["heldout_samples"] == 10
    assert any(f.startswith("resnet18-cifar10-") for f in os.listdir(tmp_path / "c"))
    vit = get_backbone("vit", (32, 32, 3), dim=8, depth=1, heads=2)
    p, _, rep = pretrain.pretrained_backbone(vit, "cifar10", steps=1, data_dir=data)
    assert rep["source"] == "cifar10" and rep["image_size"] == 32
    fresh = vit.init(jax.random.PRNGKey(0))[0]
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(p), leaves(fresh)))  # trained, not the init


def test_missing_or_wrong_folder_is_a_config_error_naming_the_setting_and_the_layout(tmp_path, capsys):
    bb = get_backbone("mlp", (32 * 32 * 3,), hidden=[8])
    with pytest.raises(ConfigError, match=r"clr\.pretrained=cifar10 needs clr\.pretrain_data_dir: a CIFAR-10 "
                                          r"folder with train/<class>/\*\.jpg and test/<class>/\*\.jpg"):
        pretrain.pretrained_backbone(bb, "cifar10", setting="clr.pretrained", data_setting="clr.pretrain_data_dir")
    with pytest.raises(ConfigError, match=r"clr\.pretrain_data_dir='.*nowhere': data dir .*nowhere does not exist;"
                                          r" .*CIFAR-10 pretraining reads train/<class>/\*\.jpg"):
        pretrain.pretrained_backbone(bb, "cifar10", data_dir=str(tmp_path / "nowhere"),
                                     data_setting="clr.pretrain_data_dir")
    half = tmp_path / "half"
    write_cifar(half)
    subprocess.run(["rm", "-r", str(half / "test")], check=True)
    with pytest.raises(ConfigError, match=r"pretrain_data_dir=.*no test/ folder in .*half"):
        pretrain.pretrained_backbone(bb, "cifar10", data_dir=str(half))
    with pytest.raises(ConfigError, match=r"reads square RGB images .* reads \(64,\)"):
        pretrain.pretrained_backbone(get_backbone("mlp", (64,), hidden=[8]), "cifar10", data_dir=str(half))
    assert main(["run", "--method", "clr", "--set", "clr.pretrained=cifar10", "--set", "backbone.nf=2",
                 "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "clr.pretrain_data_dir" in err and "train/<class>/*.jpg" in err


@pytest.fixture(scope="module")
def shared_cifar10(shared_data_dir, tmp_path_factory):
    """../shared/data/cifar10-images.tar.gz extracted once."""
    out = str(tmp_path_factory.mktemp("cifar10"))
    subprocess.run(["tar", "-xzf", os.path.join(shared_data_dir, "cifar10-images.tar.gz"), "-C", out], check=True)
    return out


def test_pretraining_on_the_shared_cifar10_learns(shared_cifar10):
    """60 steps of a small MLP on the real CIFAR-10: well above chance (0.1) on the 10,000 test images."""
    bb = get_backbone("mlp", (32 * 32 * 3,), hidden=[64])
    _, _, rep = pretrain.pretrained_backbone(bb, "cifar10", steps=60, data_dir=shared_cifar10)
    assert (rep["train_samples"], rep["heldout_samples"], rep["classes"]) == (50000, 10000, CLASSES)
    assert rep["heldout_accuracy"] > 0.18, rep
