"""IBM on Split-TinyImageNet, 10 tasks x 20 classes (TIL), ResNet-18 (nf=64) with the authors' 7x7
stride-2 stem without max-pool: Chen et al. 2023 (arXiv 2312.00840, Table 1, TinyImageNet column) with
the authors' released settings (zackschen/IBM-Net ``config/TinyImageNet/ib.sh``,
``dataset/seq_tinyimagenet.py``: ``N_TASKS = 10``, ``N_CLASSES_PER_TASK = 20``;
``backbone/ResNet18_IB.py``: ``conv7x7`` stride 2, padding 3, then BatchNorm and ReLU, no pooling, for
every data set but CIFAR-100): Adam lr 1e-3, batch 256, 300 epochs per task, ``kl_fac`` 1e-3, SVD ratio
on and recomputed every 50 epochs, variational lr multiplier 1, BatchNorm of the test batch
(``ibm.bn=batch``), labels in folder order (``data.class_order=natural``). Everything else as
``ibm_cifar100.py`` (whose docstring explains the FWT the authors report).

    python experiments/ibm_tinyimagenet.py --workdir runs/ibm_tiny --set data_dir=PATH
    python experiments/ibm_tinyimagenet.py --set benchmark=split-tinyimagenet-20   # 20 tasks x 10
    python experiments/ibm_tinyimagenet.py --set benchmark=split-tinyimagenet32 --set data_dir=PATH
        # the 32x32 re-encode (label figures "Tiny-ImageNet 32x32"; the stem halves it to 16x16)

Needs tiny-imagenet-200 on disk (``data_dir``). 300 epochs x 40 steps a task (10,000 images at batch
256) are ~12,000 Adam steps, twice the ~6,300 at which a tiny run at ``vb_lr_mult=1`` already prunes
(``ibm_cifar100.py``), so the masks here can prune (not run at this scale here).

The authors' RandomCrop(64, padding=4) pads 4 pixels: ``data.crop_pad=4`` (clax's default pads
``image_size // 8``, 8 pixels at 64x64). Known deviations: their normalisation is mean (0.4802, 0.4480, 0.3975), std (0.2302,
0.2265, 0.2262), clax's Tiny-ImageNet statistics have the same mean and std (0.277, 0.269, 0.282);
their BatchNorm has no scale or bias (clax's has them); their test set is the release's ``val/`` folder,
as clax's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the base protocol sits beside
from ibm_cifar100 import get_config as cifar100_config  # noqa: E402


def get_config() -> dict:
    """IBM on Split-TinyImageNet (10 tasks of 20), ResNet-18 nf=64 with the 7x7/2 stem without max-pool,
    300 epochs: the authors' released script."""
    cfg = cifar100_config()
    cfg["benchmark"] = "split-tinyimagenet"
    cfg["backbone"] = {"name": "resnet18", "nf": 64, "stem": "imagenet-nomaxpool"}
    cfg["train"]["epochs"] = 300
    cfg["data"]["crop_pad"] = 4  # RandomCrop(64, padding=4)
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
