"""IBM on Split-TinyImageNet, 20 tasks x 10 classes (TIL), ResNet-18 (nf=64, 3x3 stem): the protocol of
Chen et al. 2023 (arXiv 2312.00840, Table 1, TinyImageNet columns) with the hyperparameters of the
authors' config/TinyImageNet/ib.sh: Adam lr 1e-3, batch 256, 300 epochs per task, kl_fac 1e-3, SVD
ratio on and recomputed every 50 epochs, variational lr multiplier 1.

    python experiments/ibm_tinyimagenet.py --workdir runs/ibm_tiny [--set seed=1 ...]

Needs tiny-imagenet-200 on disk (``--set data_dir=PATH``). The 10-task split of the authors' code is
``--set benchmark=split-tinyimagenet``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _isolation import base_config, main  # noqa: E402


def get_config() -> dict:
    """IBM on Split-TinyImageNet (20 tasks), ResNet-18 nf=64: the authors' released hyperparameters."""
    cfg = base_config("ibm", "split-tinyimagenet-20")
    cfg["backbone"] = {"name": "resnet18", "nf": 64, "stem": "cifar"}
    cfg["train"].update(epochs=300, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=0.0)
    cfg["ibm"].update(kl_fac=1e-3, kl_per_sample=True, svd=True, svd_every=50, vb_lr_mult=1.0)
    return cfg


if __name__ == "__main__":
    main(get_config)
