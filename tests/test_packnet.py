"""PackNet: prune by magnitude, retrain, freeze; zero forgetting."""
import jax
import numpy as np
import pytest

from isolation import SMALL, assert_capacity, assert_isolation, isolation_run
from clax.methods import TaskData, get_method


@pytest.fixture(scope="module", params=["split-digits", "permuted-digits"])
def out(request):
    return isolation_run("packnet", request.param, epochs=2, sets=SMALL + ("packnet.prune_after=1",))


def test_zero_forgetting_and_frozen_union(out):
    assert_isolation(out)


def test_is_a_chain_of_the_masked_network_and_its_transforms(out):
    meth = get_method("packnet", out["ctx"])
    assert meth.model.name == "packnet" and meth.model.scenarios == ("til",) and not meth.model.default
    assert [tr.name for tr in meth.transforms] == ["prune", "consolidation", "bn_refresh"]
    assert [tr.name for tr in get_method("packnet", out["ctx"], bn="running").transforms] == ["prune", "consolidation"]


def test_learns_and_each_task_keeps_half_of_the_free_weights(out):
    assert np.all(np.diag(out["accuracy_matrix"]) > 0.65), np.diag(out["accuracy_matrix"])
    assert_capacity(out)
    # prune=0.5: task t owns half of what was free, so capacity is 1 - 0.5^(t+1)
    np.testing.assert_allclose(out["report"]["capacity_used"], [0.5, 0.75, 0.875], atol=1e-3)


def test_pruning_releases_the_smallest_half_of_the_task_weights_and_zeroes_them(out):
    meth = get_method("packnet", out["ctx"], prune=0.5)
    cl = meth.init(jax.random.PRNGKey(1))
    data = TaskData(0, np.zeros((1, 64), np.float32), np.zeros(1, np.int32), jax.random.PRNGKey(0), 32)
    cl = meth.begin_task(cl, data)
    before = jax.tree.map(np.asarray, cl.shared["weights"])
    cl = meth.end_task(cl, data)
    for w0, w1, o in zip(jax.tree.leaves(before), jax.tree.leaves(cl.shared["weights"]),
                         jax.tree.leaves(cl.extra["prune"]["owner"])):
        o, w1 = np.asarray(o), np.asarray(w1)
        kept = np.abs(w0) >= np.median(np.abs(w0))
        np.testing.assert_array_equal(o == 1, kept)
        np.testing.assert_array_equal(w1, np.where(kept, w0, 0))


@pytest.mark.parametrize("bad", [0.0, 1.0, 2.0])
def test_prune_outside_0_1_is_refused_with_its_name(out, bad):
    with pytest.raises(ValueError, match="packnet.prune"):
        get_method("packnet", out["ctx"], prune=bad)


def test_layer_filter_matching_nothing_is_refused_with_its_name(out):
    with pytest.raises(ValueError, match="packnet.layers='nothing_here' matches no weight"):
        get_method("packnet", out["ctx"], layers="nothing_here").init(jax.random.PRNGKey(0))
