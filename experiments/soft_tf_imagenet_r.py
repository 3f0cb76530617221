"""Soft-TF on 10-split ImageNet-R with a ViT-B/16 (Kang & Yoo, arXiv 2411.16073), CIL and TIL.

Paper protocol (SPEC.md section 2): a frozen ImageNet-21k ViT-B/16; soft masks on qkv, proj, fc1,
fc2 of the last three blocks; Adam, constant lr 0.005, batch 24, gradient clipping 1.0, label
smoothing 0.1 (epochs as for CIFAR, 20). CIL infers the task id; clax does not add DualPrompt.

    python experiments/soft_tf_imagenet_r.py --workdir runs/soft-tf-imr \
        --set backbone.pretrained=/path/to/ViT-B_16.npz --set soft_tf.pretrained=none

Compare with: the Soft-TF rows of the paper's 10-split ImageNet-R table (with DualPrompt, which
clax does not add); TIL BWT must be exactly 0.0. Not run here (needs the data and a GPU); the same config
runs at tiny scale on the offline digits in tests/test_soft_tf.py.
"""
from clax.config import default_config


def get_config() -> dict:
    cfg = default_config("soft_tf", "split-digits")
    cfg["benchmark"] = "imagenet-r"
    cfg["scenario"] = "cil"
    cfg["backbone"] = {"name": "vit", "patch": 16, "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0, "pretrained": ""}
    cfg["train"].update(epochs=20, batch_size=24, optimizer="adam", lr=0.005, clip=1.0)
    cfg["soft_tf"].update(masked_blocks=3, label_smoothing=0.1)
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
