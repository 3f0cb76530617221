"""experiments/cifar10_budgets.py: every run's config is its protocol's on split-cifar10 and validates,
per-run overrides reach only their run, and the report's verdicts follow the numbers."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import cifar10_budgets as cb  # noqa: E402

from clax.config import apply_overrides, validate  # noqa: E402


def test_every_run_is_its_protocol_on_split_cifar10(tmp_path):
    import ibm_cifar100
    import pah_cifar100
    import wsn_cifar100

    for name in cb.RUNS:
        cfg = cb.config(name, str(tmp_path))
        validate(cfg)
        assert cfg["benchmark"] == "split-cifar10" and cfg["method"] == name and cfg["data_dir"] == str(tmp_path)
    for name, mod in (("pah", pah_cifar100), ("ibm", ibm_cifar100), ("wsn", wsn_cifar100)):
        want = mod.get_config()
        got = cb.config(name, str(tmp_path))
        assert {k: got[k] for k in ("train", "backbone", "data", name)} == {k: want[k] for k in ("train", "backbone", "data", name)}
    pah, ft = cb.config("pah", "d"), cb.config("finetune", "d")
    assert ft["train"] == pah["train"] and ft["backbone"] == pah["backbone"] and ft["data"] == pah["data"]
    with pytest.raises(ValueError, match="unknown run 'nope'"):
        cb.config("nope", "d")


def test_overrides_for_one_run_reach_only_that_run():
    sets = ["wsn:train.epochs=10", "data.per_class=5", "pah:pah.bn=running"]
    assert cb._overrides("wsn", sets) == ["train.epochs=10", "data.per_class=5"]
    assert cb._overrides("pah", sets) == ["data.per_class=5", "pah.bn=running"]
    assert apply_overrides(cb.config("wsn", "d"), cb._overrides("wsn", sets))["train"]["epochs"] == 10


def _summary(root, run, seed, acc, bwt, forgetting, density=None):
    d = os.path.join(root, f"{run}-s{seed}")
    os.makedirs(d)
    s = {"run": run, "seed": seed, "acc": acc, "bwt": bwt, "forgetting": forgetting,
         "mask_density": None if density is None else [1.0, density], "train_s": 10.0, "wall_s": 12.0,
         "device": "Test GPU (gpu)", "epochs_run": [3, 2], "overrides": [f"seed={seed}"],
         "budget": {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "constant",
                    "val_fraction": 0.1, "backbone": {"name": "resnet18", "nf": 20}}}
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(s, f)


def test_report_verdicts_follow_the_numbers(tmp_path):
    root = str(tmp_path)
    _summary(root, "pah", 0, 0.8, 0.0, 0.01)
    _summary(root, "pah", 1, 0.9, 0.0, 0.03)
    _summary(root, "finetune", 0, 0.6, -0.3, 0.3)
    _summary(root, "hnet", 0, 0.8, -0.01, 0.015)
    _summary(root, "ibm", 0, 0.9, 0.0, 0.0, density=0.2)
    _summary(root, "wsn", 0, 0.9, 0.0, 0.0, density=0.5)
    text = cb.report(root, note="a note")
    assert "Device: Test GPU (gpu)." in text and "a note" in text
    assert "| pah | resnet18 nf=20, 3 ep, batch 64, adam 0.001, constant, val 0.1 | 0,1 | 0.850 ± 0.071 |" in text
    # PAH's mean forgetting 0.02 is above hnet's 0.015: the claim does not hold
    assert "PAH forgets less than finetune and hnet (PAH paper, Table 1): does not hold here: forgetting 0.020" in text
    assert "density 0.200 vs 0.500 (60% sparser)" in text and ": holds in part:" in text  # the last per-task value
    assert "BWT and forgetting exactly 0 (ibm, wsn): holds" in text
    _summary(root, "hnet", 1, 0.8, -0.05, 0.185)  # hnet's mean forgetting now 0.1: PAH forgets less
    assert "Table 1): holds: forgetting 0.020 vs 0.300 and 0.100" in cb.report(root)
