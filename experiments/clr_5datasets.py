"""CLR on 5-datasets (CIFAR-10, MNIST, SVHN, notMNIST, Fashion-MNIST; 5 tasks, TIL) with an
ImageNet-style ResNet-18 (Ge et al., ICCV 2023, arXiv 2307.11386).

Paper protocol (SPEC.md section 1): frozen ImageNet ResNet-18 (nf=64, torchvision stem), per-task
depthwise 3x3 reprogramming, BatchNorm and head; Adam lr 1e-3, weight decay 1e-5, 60 epochs, batch 32
(constant lr: clax has no step decay).

    python experiments/clr_5datasets.py --workdir runs/clr-5datasets \
        --set backbone.pretrained=/path/to/resnet18_imagenet.safetensors --set clr.pretrained=none

Compare with: the paper's claim of no forgetting at under 0.6% extra parameters per task (its
53-task SKILL results); BWT must be exactly 0.0. Not run here (needs the data and a GPU); the same
config runs at tiny scale on the offline digits in tests/test_clr.py.
"""
from clax.config import default_config


def get_config() -> dict:
    cfg = default_config("clr", "split-digits")
    cfg["benchmark"] = "5-datasets"
    cfg["scenario"] = "til"
    cfg["backbone"] = {"name": "resnet18", "nf": 64, "stem": "imagenet", "pretrained": ""}
    cfg["train"].update(epochs=60, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=1e-5)
    cfg["clr"].update(kernel_size=3, full=False)
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
