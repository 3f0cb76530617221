"""WSN: top-c% masks per task, bit-packed storage, consolidated union frozen, zero forgetting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isolation import SMALL, assert_capacity, assert_isolation, isolation_run
from clax.methods import get_method
from clax.partition import task_row
from clax.transforms import binary_mask


@pytest.fixture(scope="module", params=["split-digits", "permuted-digits"])
def out(request):
    return isolation_run("wsn", request.param, epochs=2, sets=SMALL)


def test_zero_forgetting_and_frozen_union(out):
    assert_isolation(out)


def test_learns_and_reports_capacity(out):
    assert np.all(np.diag(out["accuracy_matrix"]) > 0.65), np.diag(out["accuracy_matrix"])
    assert_capacity(out)
    # every task keeps exactly the top 50% of each layer
    np.testing.assert_allclose(out["report"]["mask_density"], 0.5, atol=1e-6)


def test_stored_masks_are_the_bitpacked_top_c_of_the_scores(out):
    cl, meth = out["state"].cl, out["method"]
    row = np.asarray(cl.extra["packed"][1])
    offset = 0
    for sc in jax.tree.leaves(task_row(cl.per_task["scores"], 1)):
        n = binary_mask.packed_nbytes(sc.shape)
        want = np.asarray(binary_mask.top_fraction(sc, 0.5)) > 0
        np.testing.assert_array_equal(binary_mask.unpack(row[offset:offset + n], sc.shape), want)
        offset += n
    assert meth.task_bytes(cl, 0) == offset == row.size


def test_scores_get_a_straight_through_gradient(out):
    meth = out["method"]
    cl = out["state"].cl
    x = jnp.asarray(out["bench"].tasks[0].x_train[:8])
    batch = {"x": x, "y": jnp.zeros(8, jnp.int32), "tid": jnp.zeros(8, jnp.int32)}

    def f(scores):
        pt = {**cl.per_task, "scores": scores}
        return meth.loss(cl.replace(per_task=pt), batch, jax.random.PRNGKey(0), 0)[0]

    g = jax.grad(f)(cl.per_task["scores"])
    leaf = jax.tree.leaves(g)[0]
    assert float(jnp.abs(leaf[0]).sum()) > 0  # task 0's row receives a gradient through the mask
    assert float(jnp.abs(leaf[1]).sum()) == 0


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_0_1_is_refused_with_its_name(out, bad):
    with pytest.raises(ValueError, match="wsn.sparsity"):
        get_method("wsn", out["ctx"], sparsity=bad)


def test_layer_filter_matching_nothing_is_refused_with_its_name(out):
    with pytest.raises(ValueError, match="no_such_layer"):
        get_method("wsn", out["ctx"], layers="no_such_layer").init(jax.random.PRNGKey(0))


def test_experiment_config_runs_at_tiny_scale_with_zero_forgetting():
    """experiments/wsn_cifar100.py on the offline digits: 2 tasks, 1 epoch, the MLP for ResNet-18."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import wsn_cifar100

    from clax.config import apply_overrides

    cfg = wsn_cifar100.get_config()
    assert cfg["backbone"] == {"name": "resnet18", "nf": 64, "stem": "cifar"} and cfg["wsn"]["sparsity"] == 0.5
    cfg = apply_overrides({**cfg, "benchmark": "split-digits"},
                          ["backbone.name=mlp", "backbone.hidden=[32,32]", "train.epochs=1"])
    out = isolation_run("wsn", cfg=cfg, num_tasks=2)
    assert out["cfg"]["train"]["batch_size"] == 64
    assert_isolation(out)


def test_capacity_plot_writes_a_png(out, tmp_path):
    from clax.plot import capacity_plot

    path = tmp_path / "capacity.png"
    capacity_plot({"wsn": out["report"], "other": {"capacity_used": [0.2, 0.4, 0.5]}}, str(path), "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
