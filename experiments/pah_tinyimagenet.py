"""PAH on Split-TinyImageNet, 10 tasks x 20 classes (De La Fuente et al., arXiv 2505.07450, Table 1,
TinyImageNet column): the Split-CIFAR100 protocol of ``pah_cifar100.py`` (reduced ResNet-18 nf=20,
CIFAR stem; the authors' bias-free LeakyReLU hypernetwork with two hidden layers of 16; AdamW lr 1e-3,
backbone 1e-4, 15 epochs, batch 64, KD weight 0.5 at T = 2; batch-statistics BatchNorm, no
augmentation, 10% validation that is only logged, classes in label order) with the authors'
TinyImageNet preprocessing (pah2025/PAH ``utils.py`` ``setup_tinyimagenet_prototype``): images at 64x64
normalised with the ImageNet statistics (``data.normalize=imagenet``).

    python experiments/pah_tinyimagenet.py --workdir runs/pah-tinyimagenet --set data_dir=PATH
    python experiments/pah_tinyimagenet.py --set pah.init=random        # the random-prototype ablation

Reported: TinyImageNet (10 tasks): 63.65 +- 1.94 ACC, 4.43 forgetting. Not run here (needs the data
on disk and a GPU); the same config runs at tiny scale on the offline digits in tests/test_pah.py.
The backbone question (the paper's reduced ResNet-18 against the released ImageNet-pretrained
MobileNetV2) is stated in ``pah_cifar100.py``. Further deviation: the authors' 10x10 semantic
prototype of a 64x64 image is the crop at rows/columns 11..20 (offsets written for 32x32 images, so
off-centre at 64x64); clax crops the centre.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the base protocol sits beside
from pah_cifar100 import get_config as cifar100_config  # noqa: E402


def get_config() -> dict:
    """PAH on Split-TinyImageNet: the Split-CIFAR100 protocol (pah_cifar100.py) on another stream."""
    cfg = cifar100_config()
    cfg["benchmark"] = "split-tinyimagenet"
    cfg["data"]["normalize"] = "imagenet"
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
