"""PAH on split-digits (TIL): generated heads, the two optimiser steps, prototypes, checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from battery import assert_no_recompile_after_first_task, quick_config, quick_run
from clax.checkpoint import restore_raw
from clax.methods.base import TaskData
from clax.methods.pah import semantic_prototype
from clax.runner import build, run

# the same backbone and training for PAH and finetune; a learning rate at which finetune forgets
SETS = ["backbone.hidden=[64]", "train.lr=5e-3", "train.optimizer=adamw", "train.weight_decay=0.01"]


@pytest.fixture(scope="module")
def pah_run(tmp_path_factory):
    w = tmp_path_factory.mktemp("pah")
    cfg = quick_config("pah", scenario="til", epochs=3, sets=SETS)
    return run(cfg, workdir=str(w), progress=False), str(w)


def test_pah_forgets_less_than_finetune(pah_run):
    res, _ = pah_run
    ft = quick_run("finetune", scenario="til", epochs=3, sets=SETS)
    assert res["forgetting"] < ft["forgetting"], (res["forgetting"], ft["forgetting"])
    assert res["acc"] > 0.85


def test_checkpoint_holds_prototypes_and_hypernetwork_but_no_heads(pah_run):
    res, w = pah_run
    item, cfg = restore_raw(w)
    cl = item["train_state"]["cl"]
    assert set(cl["shared"]) == {"backbone", "hnet", "protos"}
    assert np.asarray(cl["shared"]["protos"]).shape == (5, 2, 10, 10, 1)
    assert not cl["per_task"]  # nothing stored per task but the prototypes
    paths = ["/".join(map(str, k)) for k in flatten_dict(cl)]
    assert not [p for p in paths if "head" in p], paths
    # the only per-task bytes are the prototypes: 2 classes x 10 x 10 x 1 float32
    assert res["params"]["bytes_per_task"] == [800] * 5
    assert_no_recompile_after_first_task(res)
    assert res["timing"]["traces"] == {"train_step": 1, "eval_step": 1}


@pytest.fixture(scope="module")
def built():
    bench, ctx, meth = build(quick_config("pah", scenario="til", sets=SETS))
    cl = meth.init(jax.random.PRNGKey(0))
    task = bench.tasks[1]
    y = task.targets(task.y_train, "til")
    data = TaskData(1, task.x_train, y, jax.random.PRNGKey(1), 32)
    return bench, ctx, meth, cl, data


def test_semantic_init_uses_one_image_per_class_and_removes_it(built):
    bench, ctx, meth, cl, data = built
    cl1 = meth.begin_task(cl, data)
    keep = meth.train_filter(data)
    assert len(keep) == len(data.y) - 2
    dropped = np.setdiff1d(np.arange(len(data.y)), keep)
    assert sorted(data.y[dropped].tolist()) == [0, 1]
    for c in (0, 1):
        i = dropped[data.y[dropped] == c][0]
        want = semantic_prototype(data.x[i], (8, 8, 1), 10, 1)
        np.testing.assert_allclose(np.asarray(cl1.shared["protos"][1, c]), want, rtol=1e-6)
    # other tasks' prototypes are left alone; the teacher is the model before the task
    np.testing.assert_array_equal(cl1.shared["protos"][0], cl.shared["protos"][0])
    np.testing.assert_array_equal(cl1.extra["teacher"]["protos"], cl.shared["protos"])


def test_prototype_step_moves_only_old_prototypes(built):
    bench, ctx, meth, cl, data = built
    cl1 = meth.begin_task(cl, data)
    # make the student differ from the teacher so that the alignment loss has a gradient
    cl1 = cl1.replace(shared={**cl1.shared, "hnet": jax.tree.map(lambda p: 1.1 * p, cl1.shared["hnet"])})
    batch = {"x": jnp.asarray(data.x[:32]), "y": jnp.asarray(data.y[:32]), "tid": jnp.ones(32, jnp.int32)}
    cl2 = jax.jit(meth.post_update)(cl1, batch, jax.random.PRNGKey(0), jnp.int32(1))
    p1, p2 = np.asarray(cl1.shared["protos"]), np.asarray(cl2.shared["protos"])
    assert not np.allclose(p2[0], p1[0])            # task 0 (old) moves
    np.testing.assert_array_equal(p2[1:], p1[1:])   # the current and future tasks do not
    for a, b in zip(jax.tree.leaves(cl1.shared["backbone"]), jax.tree.leaves(cl2.shared["backbone"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sets, needle", [
    (["scenario=cil"], "scenario 'cil'"),
    (["pah.proto_size=0"], "pah.proto_size"),
    (["pah.init=zeros"], "pah.init"),
])
def test_bad_settings(sets, needle):
    with pytest.raises(ValueError, match=needle):
        build(quick_config("pah", sets=sets))


@pytest.mark.parametrize("name", ["pah_cifar100", "pah_tinyimagenet"])
def test_pah_experiments_run_tiny_on_digits(name):
    import importlib
    import sys
    sys.path.insert(0, "experiments")
    from test_hnet import _tiny

    cfg = importlib.import_module(name).get_config()
    assert cfg["backbone"] == {"name": "resnet18", "nf": 20, "stem": "cifar"} and cfg["pah"]["alpha"] == 0.5
    out = _tiny(cfg, 2)
    assert np.isfinite(out["acc"]) and out["accuracy_matrix"].shape == (2, 2)
    assert out["state"].cl.shared["protos"].shape == (2, 2, 10, 10, 1)
    assert_no_recompile_after_first_task(out)
