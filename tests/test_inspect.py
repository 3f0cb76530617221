import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from battery import snapshot
from clax import checkpoint as ckpt
from clax.cli import main
from clax.inspect import describe, distance_matrix
from clax.partition import CLState
from clax.train import Progress, TrainState


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    w = tmp_path_factory.mktemp("inspect") / "w"
    assert main(["run", "--method", "replay", "--scenario", "til", "--epochs", "1", "--quiet",
                 "--workdir", str(w)]) == 0
    return w


def test_inspect_json_lists_every_partition_and_its_counts_add_up_to_results_json(finished, capsys):
    capsys.readouterr()
    assert main(["inspect", str(finished), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    res = json.loads((finished / "results.json").read_text())
    assert d["tasks_done"] == 5 and d["num_tasks"] == 5 and d["task_step"] == 0
    assert set(d["partitions"]) == set(res["params"]["partitions"])
    for name, p in d["partitions"].items():
        assert p["count"] == res["params"]["partitions"][name], name
        assert p["count"] == sum(int(np.prod(e["shape"])) for e in p["leaves"])
        assert p["bytes"] == sum(e["bytes"] for e in p["leaves"])
    assert sum(p["count"] for p in d["partitions"].values()) == sum(res["params"]["partitions"].values())
    assert d["bytes_per_task"] == res["params"]["bytes_per_task"]
    leaves = {e["path"]: e for e in d["partitions"]["per_task"]["leaves"]}
    assert leaves["head/kernel"]["shape"][0] == 5 and leaves["head/kernel"]["dtype"] == "float32"
    assert d["accuracy_matrix"] == res["accuracy_matrix"]


def test_fwt_is_reported_in_til(finished):
    res = json.loads((finished / "results.json").read_text())
    A, b = res["accuracy_matrix"], res["init_accuracy"]
    assert res["scenario"] == "til" and res["fwt"] == pytest.approx(np.mean([A[c - 1][c] - b[c] for c in range(1, 5)]))


def test_inspect_task_restricts_to_one_row_and_text_output_names_each_leaf(finished, capsys):
    capsys.readouterr()
    assert main(["inspect", str(finished), "--task", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    row = {e["path"]: e["task_row"] for e in d["partitions"]["per_task"]["leaves"]}
    assert row["head/kernel"]["shape"] == d["partitions"]["per_task"]["leaves"][1]["shape"][1:]
    assert d["task_bytes"] == sum(r["bytes"] for r in row.values())
    assert main(["inspect", str(finished)]) == 0
    out = capsys.readouterr().out
    assert "5 of 5 tasks done" in out and "head/kernel" in out and "bytes per task" in out
    assert main(["inspect", str(finished), "--task", "9"]) == 2
    assert "--task must be in 0..4" in capsys.readouterr().err


def test_eval_re_evaluates_a_saved_run_and_matches_its_accuracy_matrix(finished, capsys):
    capsys.readouterr()
    assert main(["eval", str(finished), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    res = json.loads((finished / "results.json").read_text())
    assert r["matches"] and r["accuracy"] == res["accuracy_matrix"][-1]


def test_eval_and_inspect_of_an_empty_workdir_say_so(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no readable checkpoint in" in capsys.readouterr().err


def test_masks_task_embeddings_and_prototypes_are_found_by_name(tmp_path):
    """A synthetic state with the leaf names that WSN (``extra/packed``), HNET (``per_task/emb``) and PAH
    (``shared/protos``) use, beside the generic ``mask``/``task_emb`` names."""
    T = 3
    rng = np.random.default_rng(0)
    mask = np.zeros((T, 4, 5), bool)
    for t in range(T):
        mask[t].flat[: 5 * (t + 1)] = True                     # densities 0.25, 0.5, 0.75
    packed = np.packbits(np.ones(16, bool))[None].repeat(T, 0)  # bit-packed, all set
    emb = rng.normal(size=(T, 6)).astype(np.float32)
    protos = rng.uniform(size=(T, 2, 100)).astype(np.float32)  # PAH's table: flat 10x10x1 images
    cl = CLState(frozen={}, shared={"w": jnp.ones((3,)), "protos": jnp.asarray(protos),
                                    "hnet": {"chunk_emb": jnp.ones((T, 4))}},
                 per_task={"mask": jnp.asarray(mask), "emb": jnp.asarray(emb), "task_emb": jnp.asarray(emb)},
                 state={}, extra={"packed": jnp.asarray(packed), "seen": jnp.ones((T,), bool)})
    ts = TrainState(cl, {}, jax.random.PRNGKey(0), jnp.asarray(7, jnp.int32))
    from clax.config import default_config
    cfg = default_config("finetune")
    mngr = ckpt.manager(str(tmp_path))
    ckpt.save_progress(mngr, ts, Progress(T, 0, np.full((T, T), 0.5), None), cfg)
    mngr.wait_until_finished()
    d = describe(str(tmp_path))
    masks = {m["path"]: m for m in d["masks"]}
    assert masks["per_task/mask"]["per_task"] == {"0": 0.25, "1": 0.5, "2": 0.75}
    assert masks["extra/packed"]["packed"] and masks["extra/packed"]["per_task"]["1"] == 1.0
    assert set(masks) == {"per_task/mask", "extra/packed"}  # flags like `seen` are not masks
    dist = {t["path"]: np.asarray(t["distance"]) for t in d["task_distances"]}
    assert set(dist) == {"per_task/emb", "per_task/task_emb", "shared/protos"}  # not the chunk embeddings
    want = np.linalg.norm(emb[:, None].astype(np.float64) - emb[None], axis=-1)
    np.testing.assert_allclose(dist["per_task/emb"], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dist["shared/protos"], distance_matrix(protos))
    (png,) = d["prototypes"]
    assert png["png"] is None and not os.path.exists(tmp_path / "inspect")  # read-only: nothing drawn unasked
    (png,) = describe(str(tmp_path), png_dir=str(tmp_path / "figs"))["prototypes"]
    with open(png["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    one = describe(str(tmp_path), task=1)
    assert one["masks"][0]["per_task"] == {"1": 0.5}
    by_path = {t["path"]: t for t in one["task_distances"]}
    np.testing.assert_allclose(by_path["per_task/emb"]["from_task"], want[1], rtol=1e-12, atol=1e-12)


def test_inspect_and_eval_write_nothing_and_never_pretrain(tmp_path, capsys, monkeypatch):
    """A CLR checkpoint whose config was tampered with to pretrain on glyphs into a folder outside the
    workdir: inspect and eval read the frozen backbone from the checkpoint, pretrain nothing and write
    nothing anywhere; eval of an unfinished run says which tasks it compared."""
    import clax.pretrain
    from clax.config import apply_overrides, default_config, train_config
    from clax.runner import build
    from clax.train import make_optimizer, trainable

    elsewhere = tmp_path / "elsewhere"
    cfg = apply_overrides(default_config("clr"), ["backbone.nf=2", "clr.pretrained=glyphs", "clr.pretrain_steps=1",
                                                  "clr.pretrain_seed=12345", f"clr.pretrain_dir={elsewhere}"])
    calls = []

    def no_pretraining(*args, **kwargs):
        calls.append(args)
        raise AssertionError("pretraining ran")

    monkeypatch.setattr(clax.pretrain, "pretrain", no_pretraining)
    _, ctx, method = build(apply_overrides(cfg, ["clr.pretrained=none"]))  # the state's structure
    tx = make_optimizer(train_config(cfg))
    cl = jax.jit(method.init)(jax.random.PRNGKey(1))
    T = ctx.num_tasks
    w = tmp_path / "w"
    mngr = ckpt.manager(str(w))

    def save(step, done, task_step, A):
        ts = TrainState(cl, tx.init(trainable(cl, 0)), jax.random.PRNGKey(2), jnp.asarray(step, jnp.int32))
        ckpt.save_progress(mngr, ts, Progress(done, task_step, A, None, task_key=jax.random.PRNGKey(3)
                                              if task_step else None, epoch_metrics={"loss": [0.5] * task_step}), cfg)
        mngr.wait_until_finished()

    A = np.full((T, T), np.nan)
    A[:2, :2] = 0.25  # not what eval will find: it must say it differs
    save(10, 2, 0, A)  # after task 1 of 5
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(["inspect", str(w), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bytes_per_task_from"] == "per-task row + method.task_bytes"  # the method was rebuilt
    assert main(["eval", str(w)]) == 1
    out = capsys.readouterr().out
    assert "2 of 5 tasks done" in out
    assert "compared tasks 0, 1 with the saved accuracy matrix (its row after task 1, of 5: the run is " \
           "unfinished): DIFFER" in out
    assert snapshot(tmp_path) == before
    save(13, 2, 3, A)  # inside task 2
    before = snapshot(tmp_path)
    assert main(["eval", str(w), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["compared"] == [] and r["task_step"] == 3 and len(r["accuracy"]) == 3
    assert main(["eval", str(w)]) == 0
    assert "compared nothing: the checkpoint is inside task 2" in capsys.readouterr().out
    assert snapshot(tmp_path) == before and not elsewhere.exists() and calls == []


def test_resume_inspect_and_eval_print_no_orbax_read_only_warnings(finished, caplog, capsys):
    """Orbax's absl warnings about read-only checkpoint managers ("CheckpointManagerOptions.read_only=True,
    setting save_interval_steps=0.", "Given directory is read only=...") are dropped."""
    import logging

    with caplog.at_level(logging.WARNING):
        assert main(["run", "--method", "replay", "--scenario", "til", "--epochs", "1", "--quiet",
                     "--workdir", str(finished)]) == 0  # resumes the finished run
        assert main(["inspect", str(finished)]) == 0
        assert main(["eval", str(finished)]) == 0
    noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and (
        "read_only=True" in r.getMessage() or "read only" in r.getMessage())]
    assert noise == []
    assert "resuming" in capsys.readouterr().err
