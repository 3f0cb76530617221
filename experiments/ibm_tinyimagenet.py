"""IBM on Split-TinyImageNet, 20 tasks x 10 classes (TIL), ResNet-18 (nf=64, 3x3 stem): the protocol of
Chen et al. 2023 (arXiv 2312.00840, Table 1, TinyImageNet columns) with the hyperparameters of the
authors' config/TinyImageNet/ib.sh: Adam lr 1e-3, batch 256, 300 epochs per task, kl_fac 1e-3, SVD
ratio on and recomputed every 50 epochs, variational lr multiplier 1.

    python experiments/ibm_tinyimagenet.py --workdir runs/ibm_tiny [--set seed=1 ...]

Needs tiny-imagenet-200 on disk (``--set data_dir=PATH``). The 10-task split of the authors' code is
``--set benchmark=split-tinyimagenet``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the base protocol sits beside
from ibm_cifar100 import get_config as cifar100_config  # noqa: E402


def get_config() -> dict:
    """IBM on Split-TinyImageNet (20 tasks), ResNet-18 nf=64: the authors' released hyperparameters."""
    cfg = cifar100_config()
    cfg["benchmark"] = "split-tinyimagenet-20"
    cfg["train"]["epochs"] = 300
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
