"""Learning-rate schedules: the rate per epoch, the error for a bad schedule, and a run whose optimizer
state carries the scheduled rate of its last epoch without recompiling."""
import math

import numpy as np
import pytest

from clax.train import TrainConfig, lr_at, make_optimizer
from tests.battery import quick_run


def test_step_and_cosine_rates():
    step = TrainConfig(lr=1e-3, epochs=60, lr_schedule="step:20:0.1")
    assert [lr_at(step, e) for e in (0, 19, 20, 39, 40, 59)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    cos = TrainConfig(lr=0.5, epochs=4, lr_schedule="cosine")
    assert [lr_at(cos, e) for e in range(4)] == pytest.approx([0.5 * 0.5 * (1 + math.cos(math.pi * e / 4))
                                                             for e in range(4)])
    assert lr_at(TrainConfig(lr=0.3), 7) == 0.3


@pytest.mark.parametrize("bad", ["step", "step:0:0.1", "step:x:0.1", "linear"])
def test_bad_schedule_names_itself(bad):
    with pytest.raises(ValueError, match=f"lr_schedule '{bad}'"):
        make_optimizer(TrainConfig(lr_schedule=bad))


def test_scheduled_run_ends_at_the_last_epochs_rate_without_recompiling():
    out = quick_run("finetune", scenario="til", epochs=3, num_tasks=2,
                    sets=("train.lr_schedule=step:1:0.5", "train.lr=0.01"))
    lr = float(out["state"].opt_state.hyperparams["learning_rate"])
    assert lr == pytest.approx(0.01 * 0.5 ** 2)  # task 1, epoch 2
    assert out["timing"]["compiles_after_task"][0] == out["timing"]["compiles_after_task"][1]
    assert np.isfinite(out["acc"])
