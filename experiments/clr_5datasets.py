"""CLR on 5-datasets (CIFAR-10, MNIST, SVHN, notMNIST, Fashion-MNIST; 5 tasks, TIL) with an
ImageNet-style ResNet-18 (Ge et al., ICCV 2023, arXiv 2307.11386).

Paper protocol (SPEC.md section 1): frozen ImageNet ResNet-18 (nf=64, torchvision stem), per-task
depthwise 3x3 reprogramming, BatchNorm and head; Adam lr 1e-3 with x0.1 step decay every 20
epochs, weight decay 1e-5, 60 epochs, batch 32.

    python experiments/clr_5datasets.py --workdir runs/clr-5datasets \
        --set backbone.pretrained=/path/to/resnet18_imagenet.safetensors

Compare with: the paper's claim of no forgetting at under 0.6% extra parameters per task (its
53-task SKILL results); BWT must be exactly 0.0. Not run here (needs the data and a GPU); the same
config runs at tiny scale on the offline digits in tests/test_clr.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the base protocol sits beside
from clr_split_cifar100 import get_config as split_cifar100_config  # noqa: E402


def get_config() -> dict:
    """CLR on 5-datasets: the Split-CIFAR100 protocol (clr_split_cifar100.py) on another stream."""
    cfg = split_cifar100_config()
    cfg["benchmark"] = "5-datasets"
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
