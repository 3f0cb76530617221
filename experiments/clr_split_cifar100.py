"""CLR on Split-CIFAR100 (10 tasks x 10 classes, TIL) with an ImageNet-style ResNet-18 (Ge et al.,
ICCV 2023, arXiv 2307.11386).

Paper protocol (SPEC.md section 1): a frozen ImageNet-pretrained ResNet-18 (torchvision stem, nf=64),
a per-task depthwise 3x3 reprogramming after every 3x3 convolution, per-task BatchNorm and head; Adam
lr 1e-3 with x0.1 step decay every 20 epochs, weight decay 1e-5 on the task parameters, 60 epochs,
batch 32.

    python experiments/clr_split_cifar100.py --workdir runs/clr-cifar100 \
        --set backbone.pretrained=/path/to/resnet18_imagenet.safetensors

Compare with: the paper reports CLR on its 53-task SKILL benchmark (about 0.6% extra parameters per
task, no forgetting); on Split-CIFAR100 expect BWT exactly 0.0 and per-task accuracy set by the
pretrained features. Without a checkpoint the backbone is pretrained on synthetic glyphs
(:mod:`clax.pretrain`), far weaker than ImageNet features. Not run here (needs the data and a GPU);
the same config runs at tiny scale on the offline digits in tests/test_clr.py.
"""
from clax.config import default_config


def get_config() -> dict:
    cfg = default_config("clr", "split-digits")
    cfg["benchmark"] = "split-cifar100"
    cfg["scenario"] = "til"
    cfg["backbone"] = {"name": "resnet18", "nf": 64, "stem": "imagenet", "pretrained": ""}
    cfg["train"].update(epochs=60, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=1e-5,
                        lr_schedule="step:20:0.1")
    cfg["clr"].update(kernel_size=3, full=False)
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
