"""HNET and the H-embedding-guided hypernetwork on split-digits (MLP target, TIL unless stated)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from battery import assert_no_recompile_after_first_task, quick_config, quick_run
from clax.cli import main
from clax.methods import get_method
from clax.methods.hnet import make_target
from clax.runner import build
from clax.train import fit, make_context
from clax.config import train_config

REL_BOUND = 0.02  # task 0's generated weights may move by at most 2% (relative L2) over 4 later tasks


def _run_tracking_task0(method, epochs, sets=(), num_tasks=None, scenario="til"):
    """Fit, recording task 0's generated weights (flat) after task 0 and at the end."""
    cfg = quick_config(method, scenario=scenario, epochs=epochs, sets=sets)
    bench, ctx, meth = build(cfg)
    if num_tasks:
        bench = type(bench)(bench.name, bench.tasks[:num_tasks], bench.num_classes, bench.input_shape)
        ctx = make_context(ctx.backbone, bench, ctx.scenario)
        meth = get_method(method, ctx, **cfg[method])
    hn = make_target(ctx, cfg[method], method).hn
    flat = jax.jit(lambda cl: jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(
        hn.apply(cl.shared["hnet"], cl.per_task["emb"][0]))]))
    seen = {}

    def on_task_end(t, ts, A):
        seen.setdefault("after0", np.asarray(flat(ts.cl)))

    out = fit(meth, ctx, bench, train_config(cfg), progress=False, on_task_end=on_task_end)
    w_end = np.asarray(flat(out["state"].cl))
    out["rel"] = float(np.linalg.norm(w_end - seen["after0"]) / np.linalg.norm(seen["after0"]))
    return out


@pytest.fixture(scope="module")
def hnet_til():
    return _run_tracking_task0("hnet", epochs=20)


def test_hnet_keeps_task0_weights_and_bwt(hnet_til):
    print("relative distance of task 0's weights:", hnet_til["rel"])
    assert hnet_til["rel"] < REL_BOUND, hnet_til["rel"]
    assert hnet_til["bwt"] >= -0.02, hnet_til["accuracy_matrix"]
    assert np.all(np.diag(hnet_til["accuracy_matrix"]) > 0.9)


def test_hnet_regulariser_is_what_keeps_task0():
    free = _run_tracking_task0("hnet", epochs=20, sets=["hnet.beta=0"], num_tasks=3)
    assert free["rel"] > 5 * REL_BOUND, free["rel"]


def test_hnet_no_recompile_and_per_task_cost(hnet_til):
    assert_no_recompile_after_first_task(hnet_til)
    assert hnet_til["timing"]["traces"] == {"train_step": 1, "eval_step": 1}
    assert hnet_til["params"]["per_task"][0] == 32  # only the task embedding is stored per task


def test_hnet_ent_picks_among_trained_tasks_in_cil():
    out = quick_run("hnet", scenario="cil", epochs=10, num_tasks=2)
    A = out["accuracy_matrix"]
    assert A[0, 0] > 0.9          # one trained task: the entropy rule can only pick it
    assert A[0, 1] == 0.0         # task 1 is untrained, so it is never picked
    assert A[1, 1] > 0.5 and out["acc"] > 0.5


@pytest.fixture(scope="module")
def hembed_runs():
    sets = ["hembed.solve_steps=300", "hembed.hscore_samples=200"]
    return {g: quick_run("hembed", scenario="til", epochs=3, num_tasks=4, sets=sets + [f"hembed.guidance={g}"])
            for g in ("h", "random", "none")}


def test_hembed_solves_h_embeddings_from_the_third_task(hembed_runs):
    out = hembed_runs["h"]
    cl = out["state"].cl
    h = np.asarray(cl.extra["h_emb"])
    assert np.all(h[:2] == 0) and np.all(np.linalg.norm(h[2:], axis=1) > 0)
    # the decoder of the last task's embedding points towards its H-embedding
    dec = cl.shared["decoder"]
    x = cl.per_task["emb"][3]
    for i, layer in enumerate(dec):
        x = x @ layer["kernel"] + layer["bias"]
        x = jax.nn.relu(x) if i < len(dec) - 1 else x
    cos = float(jnp.dot(x, h[3]) / (jnp.linalg.norm(x) * np.linalg.norm(h[3])))
    assert cos > 0.9, cos
    assert_no_recompile_after_first_task(out)
    assert np.all(np.diag(out["accuracy_matrix"]) > 0.8)  # 3 epochs per task


def test_hembed_switches(hembed_runs):
    plain = quick_run("hnet", scenario="til", epochs=3, num_tasks=4)
    # guidance=none is HNET: the same numbers bit for bit
    np.testing.assert_array_equal(hembed_runs["none"]["accuracy_matrix"], plain["accuracy_matrix"])
    np.testing.assert_array_equal(hembed_runs["none"]["logits_final"], plain["logits_final"])
    h_rand = np.asarray(hembed_runs["random"]["state"].cl.extra["h_emb"])
    h_h = np.asarray(hembed_runs["h"]["state"].cl.extra["h_emb"])
    assert np.all((h_rand[2:] >= 0) & (h_rand[2:] <= 1)) and not np.allclose(h_rand[2:], h_h[2:])


@pytest.mark.parametrize("method, key, value", [("hnet", "chunk_size", 0), ("hnet", "task_emb_dim", 0),
                                                ("hembed", "chunk_emb_dim", 0), ("hembed", "guidance", "oracle")])
def test_bad_settings_name_the_setting(method, key, value, capsys):
    with pytest.raises(ValueError, match=f"{method}.{key}"):
        build({**quick_config(method), method: {**quick_config(method)[method], key: value}})
    assert main(["run", "--method", method, "--set", f"{method}.{key}={value}", "--quiet"]) == 2
    assert f"{method}.{key}" in capsys.readouterr().err


def _tiny(cfg, num_tasks, sets=()):
    """An experiment config shrunk to the offline digits: 1 epoch, the first ``num_tasks`` tasks and a
    one-layer MLP in place of the ResNet (whose compilation alone would take a minute on CI's 2 cores;
    benchmarks/hypernet_step.py runs the ResNet targets)."""
    from clax.config import apply_overrides
    cfg = apply_overrides({**cfg, "benchmark": "split-digits"},
                          ["train.epochs=1", "backbone.name=mlp", "backbone.hidden=[32]", "train.batch_size=32",
                           *sets])
    bench, ctx, meth = build(cfg)
    bench = type(bench)(bench.name, bench.tasks[:num_tasks], bench.num_classes, bench.input_shape)
    ctx = make_context(ctx.backbone, bench, ctx.scenario)
    meth = get_method(cfg["method"], ctx, **cfg[cfg["method"]])
    return fit(meth, ctx, bench, train_config(cfg), progress=False)


def test_hembed_cifar_experiment_runs_tiny_on_digits():
    import sys
    sys.path.insert(0, "experiments")
    import hembed_cifar

    cfg = hembed_cifar.get_config()
    assert cfg["backbone"]["name"] == "resnet32" and cfg["hembed"]["chunk_size"] == 7000
    out = _tiny(cfg, 3, ["hembed.hscore_samples=64", "hembed.solve_steps=50", "hembed.chunk_size=2000",
                         "hembed.decoder_hidden=32"])
    assert np.isfinite(out["acc"]) and out["accuracy_matrix"].shape == (3, 3)
    assert np.linalg.norm(np.asarray(out["state"].cl.extra["h_emb"][2])) > 0  # the H-embedding was solved
    assert_no_recompile_after_first_task(out)
