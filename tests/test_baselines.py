"""The baselines behave as the literature says on split-digits (CIL, MLP)."""
import numpy as np
import pytest

from battery import assert_no_recompile_after_first_task, quick_run

CIL_EPOCHS = 3


@pytest.fixture(scope="module")
def cil():
    return {m: quick_run(m, scenario="cil", epochs=CIL_EPOCHS) for m in ("finetune", "joint", "ewc", "lwf", "replay")}


def test_finetune_forgets_in_cil_and_joint_beats_it(cil):
    assert cil["finetune"]["bwt"] < -0.5
    assert cil["joint"]["acc"] > cil["finetune"]["acc"] + 0.3


@pytest.mark.parametrize("method", ["ewc", "lwf", "replay"])
def test_regularisers_and_replay_forget_less_than_finetune_in_cil(cil, method):
    assert cil[method]["forgetting"] < cil["finetune"]["forgetting"] - 0.1


def test_accuracy_matrix_shape_and_nulls(cil):
    A = cil["finetune"]["accuracy_matrix"]
    assert A.shape == (5, 5)
    assert np.isnan(A[0, 2]) and np.isfinite(A[0, 1]) and np.isfinite(A[4]).all()


def test_new_tasks_add_no_compilation_for_finetune(cil):
    out = cil["finetune"]
    assert_no_recompile_after_first_task(out)
    # one train step and one eval step, compiled once each
    assert out["timing"]["traces"] == {"train_step": 1, "eval_step": 1}


def test_finetune_learns_each_task_in_til():
    out = quick_run("finetune", scenario="til", epochs=2)
    assert np.all(np.diag(out["accuracy_matrix"]) > 0.9)
    # the per-task head is the only per-task parameter: feature_dim * 2 + 2
    assert out["params"]["per_task"][0] == 256 * 2 + 2
