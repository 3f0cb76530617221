"""HNET and the H-embedding-guided hypernetwork on split-digits (MLP target, TIL unless stated)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from battery import assert_no_recompile_after_first_task, quick_config, quick_run
from clax.cli import main
from clax.compose import STEPPED
from clax.methods import get_method
from clax.methods.base import Context, TaskData
from clax.methods.hembed import HEMBED_DEFAULTS, hembed
from clax.methods.hnet import HNET_DEFAULTS, hnet, make_target
from clax.models import get_backbone
from clax.runner import build
from clax.train import fit, make_context
from clax.config import train_config

# Task 0's generated weights may move by at most 6% (relative L2) over 4 later tasks (beta = 0.05 in weight
# units: 4.5% measured; 80% over 2 later tasks with beta = 0).
REL_BOUND = 0.06


# --- hand examples on a tiny target (6 inputs, MLP [4], 4 tasks of 2 classes; 38 weights, 3 chunks) ---

def _tiny_ctx():
    return Context(get_backbone("mlp", (6,), hidden=[4]), 4, "til", 2, np.array([[0, 1], [2, 3], [4, 5], [6, 7]]),
                   (6,))


KEY = jax.random.PRNGKey(0)
TINY = {"chunk_size": 16, "hidden": [8], "task_emb_dim": 4, "chunk_emb_dim": 3}


def _batch(key, n=8):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, 6)), "y": jax.random.randint(ky, (n,), 0, 2),
            "tid": jnp.full((n,), 2, jnp.int32)}


def _data(t, key=jax.random.PRNGKey(5)):
    b = _batch(key, 16)
    return TaskData(t, np.asarray(b["x"]), np.asarray(b["y"]), key, 8)


def _perturb(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _weights(hn, hparams, e):
    """Task ``e``'s generated weight pytree as float64 leaves (the target network's parameters)."""
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(hn.apply(hparams, e))]


def test_regulariser_is_the_squared_distance_between_generated_weight_pytrees():
    """beta * reg must mean beta in weight units: reg = 1/t sum_{j<t} sum_leaves ||W_j(theta) - W_j(theta*)||^2
    with W the generated weights after the layout's affine (whose scales here are 0.1 to 0.43, not 1)."""
    ctx = _tiny_ctx()
    meth = hnet(ctx, **TINY)
    hn = make_target(ctx, {**HNET_DEFAULTS, **TINY}, "hnet").hn
    assert max(abs(np.log(hn.layout.scale))) > 1.0  # a non-unit output scale: raw and weight units differ
    cl = meth.init(jax.random.PRNGKey(0))
    cl = cl.replace(per_task={"emb": jax.random.normal(jax.random.PRNGKey(1), (4, 4))})
    theta_star = cl.shared["hnet"]
    t = 2
    cl = meth.begin_task(cl, _data(t))                          # the snapshot theta*
    theta = _perturb(theta_star, jax.random.PRNGKey(2))
    _, (_, m) = meth.loss(cl.replace(shared={"hnet": theta}), _batch(jax.random.PRNGKey(3)), KEY, jnp.int32(t))
    embs = cl.per_task["emb"]
    want = sum(float(np.sum((a - b) ** 2)) for j in range(t)
               for a, b in zip(_weights(hn, theta, embs[j]), _weights(hn, theta_star, embs[j]))) / t
    raw = sum(float(np.sum((np.asarray(hn.flat(theta, embs[j])) - np.asarray(hn.flat(theta_star, embs[j]))) ** 2))
              for j in range(t)) / t
    assert abs(raw - want) > 0.5 * want  # the hand example tells the two units apart
    np.testing.assert_allclose(float(m["reg"]), want, rtol=1e-4)
    # the snapshot targets are the generated weights of theta*, leaves raveled in layout order
    for j in range(4):
        np.testing.assert_allclose(np.asarray(cl.extra["output_reg"]["targets"][j]),
                                   np.concatenate([x.reshape(-1) for x in _weights(hn, theta_star, embs[j])]),
                                   rtol=1e-6, atol=1e-7)


def test_hidden_activation_is_what_the_last_layer_reads():
    """``Hypernet.hidden`` (the decoder's input) is the last hidden activation: the output layer applied to
    it gives the raw chunks."""
    hn = make_target(_tiny_ctx(), {**HNET_DEFAULTS, **TINY}, "hnet").hn
    p, e = hn.init(jax.random.PRNGKey(0)), jax.random.normal(jax.random.PRNGKey(1), (4,))
    h = hn.hidden(p, e)
    assert h.shape == (hn.num_chunks, 8) and np.all(np.asarray(h) >= 0)
    last = p["mlp"][-1]
    np.testing.assert_allclose(np.asarray((h @ last["kernel"] + last["bias"]).reshape(-1)[:38]),
                               np.asarray(hn.flat(p, e)), rtol=1e-5, atol=1e-6)


def _tiny_hembed(**sets):
    ctx = _tiny_ctx()
    s = {**TINY, "hscore_samples": 16, "solve_steps": 20, "decoder_hidden": 5, **sets}
    return ctx, hembed(ctx, **s), make_target(ctx, {**HEMBED_DEFAULTS, **s}, "hembed").hn


def _at_task2(meth, key=0):
    cl = meth.init(jax.random.PRNGKey(key))
    emb = cl.per_task["emb"]
    cl = cl.replace(per_task={"emb": jax.random.normal(jax.random.PRNGKey(key + 1), emb.shape)})
    return meth.begin_task(cl, _data(2))


def test_hembed_decoder_reads_e_t_and_every_chunk_embedding():
    """The authors' decoder input: the hypernetwork's last hidden activation over all chunks, which for
    a linear hypernetwork (their ResNet-32 one, hidden=[]) is [e_t; c_i] for every chunk i, flattened;
    L_emb therefore reaches the chunk embeddings."""
    _, meth, hn = _tiny_hembed(hidden=[])
    cl = _at_task2(meth)
    dec, e_hat = cl.extra["h_embedding"]["decoder"], cl.extra["h_embedding"]["h_emb"][2]
    e_t = np.asarray(cl.per_task["emb"][2])
    x = np.concatenate([np.r_[e_t, np.asarray(c)] for c in cl.shared["hnet"]["chunk_emb"]])   # [e_t; c_i], all i
    assert x.shape == (hn.num_chunks * 7,) and dec[0]["kernel"].shape == (hn.num_chunks * 7, 5)
    d = np.maximum(x @ np.asarray(dec[0]["kernel"]) + np.asarray(dec[0]["bias"]), 0)
    d = d @ np.asarray(dec[1]["kernel"]) + np.asarray(dec[1]["bias"])
    want = 1 - d @ np.asarray(e_hat) / (np.linalg.norm(d) * np.linalg.norm(e_hat))
    batch = _batch(jax.random.PRNGKey(3))
    _, (_, m) = meth.loss(cl, batch, KEY, jnp.int32(2))
    np.testing.assert_allclose(float(m["emb"]), want, rtol=1e-4)

    def grad_chunks(cl):
        return jax.grad(lambda ce: meth.loss(cl.replace(shared={"hnet": {**cl.shared["hnet"], "chunk_emb": ce}}),
                                             batch, KEY, jnp.int32(2))[0])(cl.shared["hnet"]["chunk_emb"])
    g = cl.extra["h_embedding"]
    other = cl.replace(extra={**cl.extra, "h_embedding": {**g, "h_emb": g["h_emb"].at[2].set(-e_hat)}})
    assert not np.allclose(grad_chunks(cl), grad_chunks(other))  # L_emb's gradient reaches every c_i
    _, meth_e, _ = _tiny_hembed(hidden=[], decoder_input="embedding")   # clax's earlier D(e_t)
    assert _at_task2(meth_e).extra["h_embedding"]["decoder"][0]["kernel"].shape == (4, 5)


def test_hembed_fresh_decoder_per_task_with_its_own_adam_at_1e_3():
    _, meth, hn = _tiny_hembed()
    assert HEMBED_DEFAULTS["decoder_lr"] == 1e-3 and HEMBED_DEFAULTS["decoder"] == "per_task"
    cl = _at_task2(meth)
    assert "decoder" not in cl.shared  # not the trainer's optimizer's
    dec = cl.extra["h_embedding"]["decoder"]
    assert int(cl.extra["h_embedding"]["decoder_opt"][0].count) == 0
    for layer in dec:  # PyTorch nn.Linear's default initialisation
        bound = 1 / np.sqrt(layer["kernel"].shape[0])
        assert np.all(np.abs(layer["kernel"]) <= bound) and np.all(np.abs(layer["bias"]) <= bound)
        assert np.std(np.asarray(layer["bias"])) > 0.2 * bound
    # one step: the decoder moves by Adam's first step (lr 1e-3) on grad of L_emb at the pre-update
    # hypernetwork: -1e-3 * g / (|g| + 1e-8)
    e_t, e_hat, w = cl.per_task["emb"][2], cl.extra["h_embedding"]["h_emb"][2], 0.1
    feats = hn.hidden(cl.shared["hnet"], e_t).reshape(-1)

    def l_emb(d):
        out = jax.nn.relu(feats @ d[0]["kernel"] + d[0]["bias"]) @ d[1]["kernel"] + d[1]["bias"]
        return w * (1 - out @ e_hat / (jnp.linalg.norm(out) * jnp.linalg.norm(e_hat)))
    g = jax.grad(l_emb)(dec)
    _, (state, _) = meth.loss(cl, _batch(jax.random.PRNGKey(3)), KEY, jnp.int32(2))
    stepped = state.pop(STEPPED)["h_embedding"]   # carried out of the loss to the update (clax.compose)
    for new, old, gi in zip(jax.tree.leaves(stepped["decoder"]), jax.tree.leaves(dec), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(new), np.asarray(old - 1e-3 * gi / (jnp.abs(gi) + 1e-8)),
                                   rtol=1e-5, atol=1e-8)
    assert int(stepped["decoder_opt"][0].count) == 1
    # the next task starts a fresh decoder and a fresh Adam
    nxt = meth.begin_task(cl.replace(state=state, extra={**cl.extra, "h_embedding": stepped}),
                          _data(3, jax.random.PRNGKey(9)))
    assert int(nxt.extra["h_embedding"]["decoder_opt"][0].count) == 0
    assert not np.allclose(nxt.extra["h_embedding"]["decoder"][0]["kernel"], stepped["decoder"][0]["kernel"])


def test_hembed_random_ablation_draws_a_standard_normal():
    _, meth, _ = _tiny_hembed(guidance="random", task_emb_dim=64)
    h = np.asarray(_at_task2(meth).extra["h_embedding"]["h_emb"][2])
    assert np.any(h < 0) and np.max(np.abs(h)) > 1.0, h  # a uniform(0, 1) draw would have neither
    assert abs(np.mean(h)) < 0.5 and 0.6 < np.std(h) < 1.5
    _, meth_u, _ = _tiny_hembed(guidance="random", random_dist="uniform", task_emb_dim=64)   # clax's earlier
    h_u = np.asarray(_at_task2(meth_u).extra["h_embedding"]["h_emb"][2])
    assert np.all((h_u >= 0) & (h_u < 1))


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
    h = np.asarray(cl.extra["h_embedding"]["h_emb"])
    assert np.all(h[:2] == 0) and np.all(np.linalg.norm(h[2:], axis=1) > 0)
    # the last task's decoder, read from the hypernetwork's hidden activation of its embedding over all
    # chunks, points towards its H-embedding
    dec = cl.extra["h_embedding"]["decoder"]
    hn = make_target(out["ctx"], out["cfg"]["hembed"], "hembed").hn
    x = hn.hidden(cl.shared["hnet"], cl.per_task["emb"][3]).reshape(-1)
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
    h_rand = np.asarray(hembed_runs["random"]["state"].cl.extra["h_embedding"]["h_emb"])
    h_h = np.asarray(hembed_runs["h"]["state"].cl.extra["h_embedding"]["h_emb"])
    assert np.any(h_rand[2:] < 0) and not np.allclose(h_rand[2:], h_h[2:])  # standard normal draws


@pytest.mark.parametrize("method, key, value", [("hnet", "chunk_size", 0), ("hnet", "task_emb_dim", 0),
                                                ("hembed", "chunk_emb_dim", 0), ("hembed", "guidance", "oracle"),
                                                ("hembed", "decoder_input", "logits"), ("hembed", "decoder", "global"),
                                                ("hembed", "random_dist", "laplace"), ("hembed", "decoder_lr", 0.0)])
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
    # the authors' protocol: a linear hypernetwork, the optimizer's lookahead, x0.1 from epoch 81, 11 tasks
    h = cfg["hembed"]
    assert h["hidden"] == [] and h["lookahead"] and h["lookahead_step"] == "optimizer" and h["beta"] == 0.05
    assert cfg["train"]["lr_schedule"] == "step:81:0.1" and cfg["train"]["lr"] == 5e-4
    assert cfg["benchmark"] == "cifar10-cifar100"
    assert cfg["data"]["class_order"] == "natural"
    from clax.train import TrainConfig, lr_at
    tc = TrainConfig(epochs=100, lr=5e-4, lr_schedule=cfg["train"]["lr_schedule"])
    assert lr_at(tc, 80) == 5e-4 and abs(lr_at(tc, 81) - 5e-5) < 1e-12  # the authors' `epoch > 80`
    cfg = {**cfg, "data": {**cfg["data"], "class_order": "seeded"}}  # split-digits has no natural order
    out = _tiny(cfg, 3, ["hembed.hscore_samples=64", "hembed.solve_steps=50", "hembed.chunk_size=2000",
                         "hembed.decoder_hidden=32"])
    assert np.isfinite(out["acc"]) and out["accuracy_matrix"].shape == (3, 3)
    h_emb = out["state"].cl.extra["h_embedding"]["h_emb"]
    assert np.linalg.norm(np.asarray(h_emb[2])) > 0  # the H-embedding was solved
    assert_no_recompile_after_first_task(out)


def test_hembed_resumed_inside_a_task_ends_bit_for_bit_as_an_uninterrupted_run():
    """The per-task decoder and its Adam state are CLState leaves (checkpointed): a run resumed from a
    mid-task-2 checkpoint (decoder in use) with a freshly built method ends exactly as the run that went on."""
    cfg = quick_config("hembed", scenario="til", epochs=1,
                       sets=["hembed.solve_steps=50", "hembed.hscore_samples=64", "hembed.decoder_hidden=16"])
    bench, ctx, _ = build(cfg)
    bench = type(bench)(bench.name, bench.tasks[:3], bench.num_classes, bench.input_shape)
    ctx = make_context(ctx.backbone, bench, ctx.scenario)
    saved = []

    def checkpoint(ts, pr):
        if not saved and pr.tasks_done == 2 and pr.task_step > 0:
            saved.append((ts, pr))

    ref = fit(get_method("hembed", ctx, **cfg["hembed"]), ctx, bench, train_config(cfg), progress=False,
              checkpoint=checkpoint, checkpoint_every=3)
    assert saved, "no checkpoint inside task 2"
    ts, _ = saved[0]
    assert int(ts.cl.extra["h_embedding"]["decoder_opt"][0].count) > 0  # the decoder had been stepped when it was saved
    out = fit(get_method("hembed", ctx, **cfg["hembed"]), ctx, bench, train_config(cfg), progress=False,
              resume=saved[0])
    np.testing.assert_array_equal(out["accuracy_matrix"], ref["accuracy_matrix"])
    for a, b in zip(jax.tree.leaves(out["state"].cl), jax.tree.leaves(ref["state"].cl)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- composition: hnet and hembed as chains; EWC on top of HNET's generated network ---

def test_hnet_and_hembed_are_chains_of_the_generated_network():
    ctx = _tiny_ctx()
    m = hnet(ctx, **TINY)
    assert m.model.name == "hnet" and not m.model.default and [tr.name for tr in m.transforms] == ["output_reg"]
    e = hembed(ctx, **TINY, decoder_hidden=5)
    assert e.model.name == "hnet" and [tr.name for tr in e.transforms] == ["output_reg", "h_embedding"]
    assert [tr.name for tr in hembed(ctx, **TINY, guidance="none").transforms] == ["output_reg"]   # exactly HNET
    shared = hembed(ctx, **TINY, decoder_hidden=5, decoder="shared")
    cl = shared.init(jax.random.PRNGKey(0))
    assert "decoder" in cl.shared and "decoder" not in cl.extra["h_embedding"]
    # CIL: the model maps global labels to the task's local ids, so the chain's ce is HNET's
    cil = Context(ctx.backbone, 4, "cil", 8, ctx.task_classes, (6,))
    model = hnet(cil, **TINY).model
    np.testing.assert_array_equal(model.targets(jnp.array([4, 5, 7]), jnp.array([2, 2, 3]), 2), [0, 1, 1])
    assert hnet(ctx, **TINY).model.targets is None


def test_ewc_plus_hnet_trains_with_fisher_over_the_hypernetwork():
    """``ewc+hnet``: EWC's transform on HNET's model (its Fisher through ``model.forward`` and
    ``model.targets``): two tasks of split-digits TIL, finite ``ce``, ``ewc`` and ``reg`` terms, and a
    nonzero Fisher of the hypernetwork after task 0."""
    from battery import tiny_digits
    from clax.train import TrainConfig

    bench = tiny_digits(2)
    ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[32]), bench, "til")
    meth = get_method("ewc+hnet", ctx, ewc={"fisher_samples": 32},
                      hnet={"chunk_size": 256, "task_emb_dim": 8, "chunk_emb_dim": 8, "hidden": [16]})
    assert meth.model.name == "hnet" and [tr.name for tr in meth.transforms] == ["ewc", "output_reg"]
    fisher = {}

    def on_task_end(t, ts, A):
        fisher[t] = ts.cl.extra["ewc"]["fisher"]

    out = fit(meth, ctx, bench, TrainConfig(epochs=1, batch_size=16), progress=False, on_task_end=on_task_end)
    assert [r["task"] for r in out["history"]] == [0, 1]
    for row in out["history"]:
        assert all(np.isfinite(row[k]) for k in ("ce", "ewc", "reg")), row
    assert out["history"][1]["ewc"] > 0 and out["history"][1]["reg"] > 0
    leaves = jax.tree.leaves(fisher[0]["hnet"])
    assert sum(float(jnp.sum(x)) for x in leaves) > 0 and all(np.all(np.asarray(x) >= 0) for x in leaves)
    assert np.all(np.isfinite(out["accuracy_matrix"][np.tril_indices(2)]))


# --- the authors' protocol: a linear hypernetwork and the lookahead with the optimizer's own step ---

def test_linear_hypernetwork_has_no_hidden_layer():
    """hidden=[] (the authors' ResNet-32 hypernetwork, --hnet_arch=''): one affine map [e; c_i] -> chunk i,
    so the generated chunks are affine in the task embedding and the decoder reads [e; c_i] itself."""
    hn = make_target(_tiny_ctx(), {**HNET_DEFAULTS, **TINY, "hidden": []}, "hnet").hn
    p = hn.init(jax.random.PRNGKey(0))
    assert len(p["mlp"]) == 1 and p["mlp"][0]["kernel"].shape == (4 + 3, 16)
    e1, e2 = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    mix = hn.flat(p, 0.3 * e1 + 0.7 * e2)
    np.testing.assert_allclose(np.asarray(mix), np.asarray(0.3 * hn.flat(p, e1) + 0.7 * hn.flat(p, e2)),
                               rtol=1e-5, atol=1e-6)
    hid = np.asarray(hn.hidden(p, e1))
    np.testing.assert_allclose(hid, np.concatenate([np.tile(np.asarray(e1), (hn.num_chunks, 1)),
                                                    np.asarray(p["chunk_emb"])], 1), rtol=1e-6)


def test_lookahead_with_the_optimizers_step_equals_a_hand_computation():
    """lookahead_step=optimizer: reg = 1/t sum_{j<t} ||W(e_j; theta + dtheta) - W(e_j; theta*)||^2 with dtheta
    Adam's step (moments so far, bias-corrected) on dCE/dtheta, computed here by hand in float64."""
    import optax

    from clax.train import trainable
    from clax.transforms.generated import optimizer_step

    ctx = _tiny_ctx()
    s = {**TINY, "hidden": [], "lookahead": True, "lookahead_step": "optimizer", "beta": 0.05}
    meth = hnet(ctx, **s)
    hn = make_target(ctx, {**HNET_DEFAULTS, **s}, "hnet").hn
    cl = meth.init(jax.random.PRNGKey(0))
    cl = cl.replace(per_task={"emb": jax.random.normal(jax.random.PRNGKey(1), (4, 4))})
    t = 2
    cl = meth.begin_task(cl, _data(t))
    theta_star = cl.shared["hnet"]
    cl = cl.replace(shared={"hnet": _perturb(theta_star, jax.random.PRNGKey(2), 0.01)})
    tr = trainable(cl, t)
    lr = 0.03
    tx = optax.adam(lr)
    opt = tx.init(tr)
    for i in range(3):  # moments away from zero, as after a few steps of the task
        g = _perturb(jax.tree.map(jnp.zeros_like, tr), jax.random.PRNGKey(10 + i), 1.0)
        opt = tx.update(g, opt, tr)[1]
    batch = _batch(jax.random.PRNGKey(3))
    with optimizer_step(lambda g: tx.update(g, opt, tr)[0]):
        total, (_, m) = meth.loss(cl, batch, KEY, jnp.int32(t))

    # by hand: the task CE's gradient on theta, Adam's update from opt's moments, the regulariser after it
    def ce(hp):
        logits, _, _ = meth.model.forward(cl.replace(shared={"hnet": hp}), batch["x"], batch["tid"], t, True, KEY)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    g = jax.grad(ce)(cl.shared["hnet"])
    adam = opt[0]
    n = int(adam.count) + 1
    b1, b2, eps = 0.9, 0.999, 1e-8

    def step(gi, mu, nu):
        gi, mu, nu = (np.asarray(v, np.float64) for v in (gi, mu, nu))
        m1, v1 = b1 * mu + (1 - b1) * gi, b2 * nu + (1 - b2) * gi ** 2
        return -lr * (m1 / (1 - b1 ** n)) / (np.sqrt(v1 / (1 - b2 ** n)) + eps)

    delta = jax.tree.map(step, g, adam.mu["shared"]["hnet"], adam.nu["shared"]["hnet"])
    ahead = jax.tree.map(lambda p, d: np.asarray(p, np.float64) + d, cl.shared["hnet"], delta)
    assert max(float(np.abs(d).max()) for d in jax.tree.leaves(delta)) > 0.5 * lr  # a real step was taken
    embs = cl.per_task["emb"]
    want = sum(float(np.sum((a - b) ** 2)) for j in range(t)
               for a, b in zip(_weights(hn, jax.tree.map(jnp.float32, ahead), embs[j]),
                               _weights(hn, theta_star, embs[j]))) / t
    np.testing.assert_allclose(float(m["reg"]), want, rtol=1e-4)
    # ... and not the regulariser without the step, nor after the plain gradient step of lookahead_step=sgd
    _, (_, m_none) = hnet(ctx, **{**s, "lookahead": False}).loss(cl, batch, KEY, jnp.int32(t))
    _, (_, m_sgd) = hnet(ctx, **{**s, "lookahead_step": "sgd"}).loss(cl, batch, KEY, jnp.int32(t))
    assert abs(float(m_none["reg"]) - want) > 0.05 * want and abs(float(m_sgd["reg"]) - want) > 0.05 * want
    # the lookahead is a constant: the regulariser's gradient is that of reg at theta + dtheta (not through it)
    with optimizer_step(lambda g: tx.update(g, opt, tr)[0]):
        gl = jax.grad(lambda hp: meth.loss(cl.replace(shared={"hnet": hp}), batch, KEY, jnp.int32(t))[0])(
            cl.shared["hnet"])
    d_reg = jax.grad(lambda hp: 0.05 * _reg_at(hn, hp, embs, cl.extra["output_reg"]["targets"], t))(
        jax.tree.map(jnp.float32, ahead))
    want_g = jax.tree.map(lambda a, b: a + b, jax.grad(ce)(cl.shared["hnet"]), d_reg)
    for a, b in zip(jax.tree.leaves(gl), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def _reg_at(hn, hp, embs, targets, t):
    from clax.transforms.output_reg import output_regulariser
    return output_regulariser(hn, hp, embs, targets, t)


def test_lookahead_with_the_optimizers_step_needs_the_trainers_step():
    ctx = _tiny_ctx()
    meth = hnet(ctx, **TINY, lookahead=True, lookahead_step="optimizer")
    cl = meth.begin_task(meth.init(KEY), _data(1))
    with pytest.raises(ValueError, match=r"hnet.lookahead_step='optimizer' needs the step of the trainer's optimizer"):
        meth.loss(cl, _batch(KEY), KEY, jnp.int32(1))
    with pytest.raises(ValueError, match=r"hembed.lookahead_step"):
        hembed(ctx, **TINY, lookahead_step="adam")
