import jax.numpy as jnp
import pytest

from clax import partition as P


def test_split_assigns_every_leaf_to_exactly_one_partition_and_merge_inverts_it():
    tree = {"conv": {"kernel": jnp.ones(3)}, "bn": {"scale": jnp.ones(2)}, "head": {"w": jnp.ones(1)}}
    parts = P.split(tree, {"frozen": r"^conv/", "per_task": r"^(bn|head)/"})
    assert P.paths(parts["frozen"]) == ["conv/kernel"]
    assert sorted(P.paths(parts["per_task"])) == ["bn/scale", "head/w"]
    assert P.paths(P.merge(parts["frozen"], parts["per_task"])) == P.paths(P.merge(tree))


def test_split_refuses_a_leaf_in_no_partition_or_in_two():
    tree = {"conv": {"kernel": jnp.ones(3)}, "bn": {"scale": jnp.ones(2)}}
    with pytest.raises(ValueError, match="'bn/scale' matches no rule"):
        P.split(tree, {"frozen": "conv"})
    with pytest.raises(ValueError, match="'conv/kernel' matches several rules"):
        P.split(tree, {"frozen": "conv", "shared": "kernel|scale"})


def test_check_refuses_a_per_task_leaf_without_the_task_axis():
    cl = P.CLState(frozen={}, shared={}, per_task={"head": jnp.ones((3, 4))}, state={}, extra={})
    P.check(cl, 3)
    with pytest.raises(ValueError, match="per-task leaf.*head.*leading axis"):
        P.check(cl, 5)


def test_task_rows_are_read_and_written_without_touching_others():
    tree = {"w": jnp.arange(12.0).reshape(3, 4)}
    out = P.set_task_row(tree, 1, {"w": jnp.zeros(4)})
    assert out["w"][1].sum() == 0 and (out["w"][0] == tree["w"][0]).all() and (out["w"][2] == tree["w"][2]).all()
