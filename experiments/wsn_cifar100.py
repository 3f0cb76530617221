"""WSN on Split-CIFAR100 (10 tasks x 10 classes, TIL), the baseline of IBM's Table 1, on IBM's
ResNet-18 (nf=64, 3x3 stem) with WSN's released hyperparameters (Kang et al., ICML 2022;
scripts/wsn/wsn_cifar100_100.sh): Adam lr 1e-3, batch 64, 200 epochs per task, kept fraction c 0.5
(their ``--sparsity 0.5``, which their scripts read as the kept fraction).

    python experiments/wsn_cifar100.py --workdir runs/wsn_cifar100 [--set wsn.c=0.1 ...]

Expected: BWT exactly 0.0; ACC to compare with IBM's Table 1, which reports WSN on
ResNet-18 beside its own result. WSN's learning-rate patience schedule (halve on plateau) is not
reproduced: clax runs a constant rate.
"""
from clax.config import default_config


def get_config() -> dict:
    """WSN on Split-CIFAR100 (10 tasks), ResNet-18 nf=64, c = 0.5: WSN's released hyperparameters."""
    cfg = default_config("wsn", "split-cifar100")
    cfg["backbone"] = {"name": "resnet18", "nf": 64, "stem": "cifar"}
    cfg["train"].update(epochs=200, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0)
    cfg["wsn"].update(c=0.5)
    return cfg


if __name__ == "__main__":
    from _common import main
    main(get_config)
