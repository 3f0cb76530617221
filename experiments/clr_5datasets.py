"""CLR on 5-datasets (CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST; 5 tasks, TIL) with an ImageNet
ResNet-18 (Ge et al., ICCV 2023, arXiv 2307.11386).

The protocol of experiments/clr_split_cifar100.py (the paper's training, the authors' 224 x 224
ImageNet-normalised inputs without augmentation and their best-epoch selection, here on 10% of each
task's training images) on another stream: every image, grey ones repeated over RGB, resized to 224.
EMNIST's handwritten letters A-J stand in for notMNIST, which TFDS lacks (:mod:`clax.data.tfds`).

    python experiments/clr_5datasets.py --workdir runs/clr-5datasets \\
        --set backbone.pretrained=/path/to/resnet18_imagenet.safetensors --set data_dir=$HOME/tensorflow_datasets
    python experiments/clr_5datasets.py --set data.image_size=32      # the 32 x 32 variant

Compare with: the paper's claim of no forgetting at under 0.6% extra parameters per task (its 53-task
SKILL results); BWT must be exactly 0.0. Deviations: those of clr_split_cifar100.py, and the notMNIST
stand-in. Not run here (needs the data and a GPU); the same config runs at tiny scale on the offline
digits in tests/test_clr.py.
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
