"""Soft-TF on 10-split ImageNet-R with a ViT-B/16 (Kang & Yoo, arXiv 2411.16073), CIL and TIL.

Paper protocol (SPEC.md section 2): a frozen ImageNet-21k ViT-B/16; soft masks on qkv, proj, fc1,
fc2 of the last three blocks; Adam, constant lr 0.005, batch 24, gradient clipping 1.0, label
smoothing 0.1. DualPrompt as in the authors' configs/imr_dualprompt_pgp.py: 50 epochs, G-prompts at
blocks 0-1, one E-prompt layer at block 5, prompt length 20 (the authors' G-prompt length is 5; clax
has one length for both); CIL infers the task id by prompt-key matching.

    python experiments/soft_tf_imagenet_r.py --workdir runs/soft-tf-imr \
        --set backbone.pretrained=/path/to/ViT-B_16.npz

Compare with: the Soft-TF rows of the paper's 10-split ImageNet-R table; TIL BWT must be exactly 0.0. Not run here (needs the data and a GPU); the same config
runs at tiny scale on the offline digits in tests/test_soft_tf.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the base protocol sits beside
from soft_tf_cifar100 import get_config as cifar100_config  # noqa: E402


def get_config() -> dict:
    """Soft-TF on 10-split ImageNet-R: the CIFAR-100 protocol (soft_tf_cifar100.py) at lr 0.005, 50
    epochs, prompt length 20 and the E-prompt at block 5 (of 12: index -7)."""
    cfg = cifar100_config()
    cfg["benchmark"] = "imagenet-r"
    cfg["train"].update(lr=0.005, epochs=50)
    cfg["soft_tf"].update(prompt_length=20, e_prompt_layers=[-7])
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
