"""experiments/results_tinyimagenet32.py's report on results.json files written here (no training):
table rows and claim verdicts follow the numbers."""
import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "results_tinyimagenet32", os.path.join(HERE, "..", "experiments", "results_tinyimagenet32.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def fake(root, method, scenario, seed, acc, bwt, forgetting, fwt=0.01, density=None, per_task=1000,
         backbone=100_000, train_s=10.0, pretrain=None):
    """A results.json as clax writes it, with only the fields the report reads."""
    r = {"method": method, "benchmark": R.BENCHMARK, "scenario": scenario, "seed": seed, "acc": acc,
         "bwt": bwt, "forgetting": forgetting, "fwt": fwt if scenario == "til" else None,
         "params": {"backbone": backbone, "bytes_per_task": [per_task] * 10},
         "timing": {"train_s": train_s},
         "config": {"data": {"per_class": 100}, "train": {"epochs": 2, "batch_size": 64},
                    "backbone": {"name": "resnet18", "nf": 10}}}
    if pretrain is not None:
        r["pretrain"] = pretrain
    if density is not None:
        r["mask_density"] = [density] * 10
        r["capacity_used"] = [min(1.0, density * (t + 1)) for t in range(10)]
    d = os.path.join(root, R.run_name(method, scenario, seed))
    os.makedirs(d)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(r, f)


def grid_of(root, change=None):
    """A full fake grid where every claim holds, with ``change`` {method: {field: value}} applied."""
    base = {
        ("finetune", "til"): dict(acc=0.30, bwt=-0.20, forgetting=0.22),
        ("finetune", "cil"): dict(acc=0.05, bwt=-0.50, forgetting=0.55),
        ("hnet", "til"): dict(acc=0.40, bwt=-0.05, forgetting=0.06),
        ("hembed", "til"): dict(acc=0.45, bwt=-0.04, forgetting=0.05),
        ("pah", "til"): dict(acc=0.50, bwt=-0.01, forgetting=0.02),
        ("wsn", "til"): dict(acc=0.50, bwt=0.0, forgetting=0.0, density=0.5),
        ("packnet", "til"): dict(acc=0.48, bwt=0.0, forgetting=0.0, density=0.3),
        ("ibm", "til"): dict(acc=0.50, bwt=0.0, forgetting=0.0, density=0.1),
        ("clr", "til"): dict(acc=0.60, bwt=0.0, forgetting=0.0, per_task=1000, backbone=1_000_000,
                             pretrain={"source": "cifar10", "steps": 1000, "epochs": 1.28, "batch_size": 64,
                                       "heldout_accuracy": 0.4567, "heldout_samples": 10000, "seconds": 99.0}),
        ("soft_tf", "til"): dict(acc=0.55, bwt=0.0, forgetting=0.0),
        ("soft_tf", "cil"): dict(acc=0.20, bwt=-0.1, forgetting=0.1),
    }
    for (m, s), kw in base.items():
        kw = {**kw, **(change or {}).get((m, s), {})}
        for seed in kw.pop("seeds", [0]):
            fake(root, m, s, seed, **kw)
    return R.summarize(R.load_runs(root))


def verdicts(rows):
    return {c["claim"]: c["verdict"] for c in R.claims(rows)}


def find(cl, start):
    [v] = [v for k, v in cl.items() if k.startswith(start)]
    return v


def test_rows_and_every_claim_holding(tmp_path):
    rows = grid_of(str(tmp_path), {("finetune", "til"): dict(seeds=[0, 1, 2])})
    ft = R._row(rows, "finetune")
    assert ft["n"] == 3 and ft["seeds"] == [0, 1, 2] and ft["acc"] == pytest.approx(0.30) and ft["acc_sd"] == 0.0
    assert R._row(rows, "hnet")["acc_sd"] is None  # one seed: no spread
    assert R._row(rows, "ibm")["mask_density"] == pytest.approx(0.1)
    assert R._row(rows, "ibm")["capacity"] == pytest.approx(1.0)
    assert R._row(rows, "hnet")["mask_density"] is None
    # registry order, TIL before CIL
    order = [(r["method"], r["scenario"]) for r in rows]
    assert order.index(("finetune", "til")) < order.index(("finetune", "cil")) < order.index(("wsn", "til"))
    md = R.table(rows)
    assert "| finetune | TIL | 0.300 ± 0.000 | -0.200 ± 0.000 |" in md
    assert "| ibm | TIL | 0.500 | +0.000 | 0.000 | +0.010 | 0.100 | 1.000 | 1,000 | 100,000 | 10 | - | 1 |" in md
    v = verdicts(rows)
    assert set(v.values()) == {"holds", "measured"}, v
    assert len(v) == len(R.ISOLATION) + 1 + 1 + 1 + 3 + 1 + 1
    text = {c["claim"]: c["text"] for c in R.claims(rows)}
    assert find(text, "Bytes stored per task").startswith("clr 0.0%, finetune 0.2%,")  # 1000 / (4 * 1e6), 1000 / 4e5


def test_verdicts_follow_the_numbers(tmp_path):
    rows = grid_of(str(tmp_path), {
        ("wsn", "til"): dict(bwt=-0.01),                       # isolation broken
        ("ibm", "til"): dict(density=0.4),                      # sparser, but only 20% fewer
        ("pah", "til"): dict(forgetting=0.10),                  # below finetune, above hnet
        ("hembed", "til"): dict(acc=0.39),                      # below hnet
        ("clr", "til"): dict(acc=0.29, per_task=10_000),        # below finetune; 0.25% of the backbone
        ("soft_tf", "cil"): dict(acc=0.04),
    })
    v = verdicts(rows)
    assert find(v, "wsn (TIL)") == "does not hold here"
    assert find(v, "packnet (TIL)") == "holds"
    assert find(v, "IBM's masks") == "holds in part"
    assert find(v, "PAH forgets") == "holds in part"
    assert find(v, "H-embedding") == "does not hold here"
    assert find(v, "CLR beats fine-tuning (TIL") == "does not hold here"
    assert find(v, "Soft-TF beats fine-tuning (TIL") == "holds"
    assert find(v, "Soft-TF beats fine-tuning (CIL") == "does not hold here"
    assert find(v, "CLR adds") == "holds"
    text = {c["claim"]: c["text"] for c in R.claims(rows)}
    assert "BWT -0.0100" in find(text, "wsn (TIL)")
    assert "0.400 vs WSN 0.500" in find(text, "IBM's masks")


def test_ibm_not_sparser_or_far_below_and_missing_runs(tmp_path):
    rows = grid_of(str(tmp_path / "a"), {("ibm", "til"): dict(density=0.05, acc=0.40)})
    assert find(verdicts(rows), "IBM's masks") == "does not hold here"  # sparser, but 0.10 below WSN's ACC
    rows = grid_of(str(tmp_path / "b"), {("ibm", "til"): dict(density=0.9)})
    assert find(verdicts(rows), "IBM's masks") == "does not hold here"
    rows = grid_of(str(tmp_path / "c"), {("clr", "til"): dict(per_task=10_000, backbone=100_000)})
    assert find(verdicts(rows), "CLR adds") == "does not hold here"  # 2.5% of the backbone
    root = tmp_path / "d"
    fake(str(root), "finetune", "til", 0, 0.3, -0.2, 0.2)
    v = verdicts(R.summarize(R.load_runs(str(root))))
    assert find(v, "H-embedding") == "not tested" and find(v, "wsn (TIL)") == "not tested"
    text = {c["claim"]: c["text"] for c in R.claims(R.summarize(R.load_runs(str(root))))}
    assert find(text, "PAH forgets") == "not tested: no finished run of pah TIL, hnet TIL"  # finetune is there


def test_report_only_writes_the_doc(tmp_path):
    grid_of(str(tmp_path / "runs"))
    out = tmp_path / "RESULTS.md"
    assert R.main(["--root", str(tmp_path / "runs"), "--report-only", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Results on Tiny-ImageNet 32x32")
    assert R.COMMAND in text and "--report-only" in text
    assert "| hembed | TIL | 0.450 |" in text and "**holds**" in text
    assert "clr (resnet18 nf 10): cifar10 1000 steps (1.28 epochs, batch 64), held-out accuracy 0.457" in text
    assert "every row 1 seed (seed 0)." in text
    assert "Not finished when this file was generated: joint-til-s0, joint-cil-s0, ewc-til-s0," in text  # none in the fake grid
    grid_of(str(tmp_path / "runs3"), {("finetune", "til"): dict(seeds=[0, 1, 2])})
    assert R.main(["--root", str(tmp_path / "runs3"), "--report-only", "--out", str(out)]) == 0
    assert "**Seeds.** finetune TIL: 3 seeds (mean ± sample sd); every other row 1 seed." in out.read_text()
    R._save_json(str(tmp_path / "runs3" / "failures.json"), {"wsn-til-s0": {"exit": 2, "log_tail": "a\nclax: error: x\n"}})
    assert R.main(["--root", str(tmp_path / "runs3"), "--report-only", "--out", str(out)]) == 0
    assert "- `wsn-til-s0`: exit 2: `clax: error: x`" in out.read_text()
    assert "100 training images per class" in text and "2 epochs per task" in text and "batch 64" in text and "nf 10" in text


def test_grid_and_overrides():
    runs = R.grid(seeds=(0,), more_seeds=(1, 2), more_methods=("finetune",))
    assert ("finetune", "til", 2) in runs and ("ewc", "til", 1) not in runs
    assert ("wsn", "cil", 0) not in runs and ("hnet", "cil", 0) in runs and ("soft_tf", "cil", 0) in runs
    a = R.overrides("clr", "til", 0, "/r", "/d", "/c")
    assert "clr.pretrained=cifar10" in a and "clr.pretrain_data_dir=/c" in a and "backbone.name=resnet18" in a
    assert "backbone.name=resnet18" not in R.overrides("soft_tf", "cil", 0, "/r", "/d", "/c")
    assert f"packnet.prune_after={max(1, R.BUDGET['epochs'] - 1)}" in R.overrides("packnet", "til", 0, "/r", "/d", "/c")


def test_run_grid_skips_finished_runs_records_failures_and_adds_up_attempts(tmp_path, monkeypatch):
    root = str(tmp_path)
    fake(root, "finetune", "til", 0, 0.3, -0.2, 0.2)  # finished before: never launched
    launched = []

    def call(cmd, stdout, stderr, cwd):
        wd = cmd[cmd.index("--workdir") + 1]
        launched.append(os.path.basename(wd) + (" fresh" if "--fresh" in cmd else ""))
        if "ewc" in wd:
            stdout.write("clax: error: something\n")
            return 2
        os.makedirs(wd, exist_ok=True)
        open(os.path.join(wd, "results.json"), "w").write("{}")
        return 0

    monkeypatch.setattr(R.subprocess, "call", call)
    runs = [("finetune", "til", 0), ("ewc", "til", 0), ("lwf", "til", 0)]
    out = R.run_grid(root, runs, "/d", "/c", jobs=1)
    assert sorted(launched) == ["ewc-til-s0", "lwf-til-s0"]
    assert set(out["wall"]) == {"lwf-til-s0"} and out["failures"]["ewc-til-s0"]["exit"] == 2
    assert "something" in out["failures"]["ewc-til-s0"]["log_tail"]
    R._save_json(os.path.join(root, "attempt_seconds.json"), {"ewc-til-s0": 1000.0})  # an earlier, long attempt
    R.run_grid(root, runs, "/d", "/c", jobs=1, fresh=("ewc-til-s0",))  # ewc again, started over: attempts add up
    assert 1000.0 <= R._load_json(os.path.join(root, "attempt_seconds.json"), {})["ewc-til-s0"] < 1100.0
    assert launched == ["ewc-til-s0", "lwf-til-s0", "ewc-til-s0 fresh"]
    assert R._load_json(os.path.join(root, "grid_wall.json"), {})["jobs"] == 1
