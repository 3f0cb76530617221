"""PAH on split-tinyimagenet (De La Fuente et al., arXiv 2505.07450, Table 1 (TinyImageNet column)): reduced ResNet-18 (nf=20, CIFAR
stem) trained with the heads generated from 10x10x1 semantic prototypes by the authors' bias-free LeakyReLU
hypernetwork (two hidden layers of 16; see pah_cifar100.py); AdamW lr 1e-3 with the backbone at 1e-4
(backbone_lr_scale 0.1), 15 epochs, batch 64, KD weight 0.5 at T = 2, TIL.

    python experiments/pah_tinyimagenet.py --workdir runs/pah-tinyimagenet
    python experiments/pah_tinyimagenet.py --set pah.init=random        # the random-prototype ablation

Reported: TinyImageNet (10 tasks): 63.65 +- 1.94 ACC, 4.43 forgetting. Not run here (needs the data
on disk and a GPU); the same config runs at tiny scale on the offline digits in tests/test_pah.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the base protocol sits beside
from pah_cifar100 import get_config as cifar100_config  # noqa: E402


def get_config() -> dict:
    """PAH on Split-TinyImageNet: the Split-CIFAR100 protocol (pah_cifar100.py) on another stream."""
    cfg = cifar100_config()
    cfg["benchmark"] = "split-tinyimagenet"
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
