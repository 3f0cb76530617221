import jax
import numpy as np

from clax import checkpoint as ckpt
from clax.cli import main


def test_a_checkpoint_is_written_per_task_and_restores_the_trainer_state(tmp_path):
    w = tmp_path / "w"
    assert main(["run", "--method", "replay", "--scenario", "til", "--epochs", "1", "--workdir", str(w),
                 "--quiet", "--set", "checkpoint.keep=10"]) == 0
    mngr = ckpt.manager(str(w))
    assert len(mngr.all_steps()) == 5
    state, cfg = ckpt.restore_raw(str(w))
    assert cfg["method"] == "replay" and int(state["task"]) == 4
    cl = state["train_state"]["cl"]
    assert set(cl) == {"frozen", "shared", "per_task", "state", "extra"}
    assert cl["per_task"]["head"]["kernel"].shape == (5, 256, 2)
    assert int(cl["extra"]["buffer"]["seen"]) > 1000
    A = state["accuracy_matrix"]
    assert A.shape == (5, 5) and np.isfinite(A[4]).all()
