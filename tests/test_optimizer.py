"""The optimizer is the user's (issue 13, item 4): ``fit(..., optimizer=...)`` uses an optax optimizer as
given; ``train.lr_scales`` and a method's own scales set per-partition learning rates
(``optax.multi_transform`` over the trained tree's paths); PAH's backbone rate is such a scale and its
state holds the real backbone weights. Resume stays exact: tests/test_resume_every_step.py covers pah."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from battery import quick_config
from clax.config import ConfigError, apply_overrides, default_config, train_config, validate
from clax.data import Benchmark, Task, train_batches
from clax.methods import get_method
from clax.methods.pah import pah
from clax.runner import build, run
from clax.train import (Steps, TrainConfig, TrainState, fit, make_context, make_optimizer, set_lr,
                        task_training_data, trainable, tree_paths, with_trainable)

N = 32  # training samples per task = the batch size: one step per task


def _tiny(cfg):
    """``(bench, ctx, method)`` of ``cfg`` on two split-digits tasks of ``N`` training images each."""
    bench, ctx, method = build(cfg)
    tasks = tuple(Task(t.task_id, t.classes, t.x_train[:N], t.y_train[:N], t.x_test[:40], t.y_test[:40])
                  for t in bench.tasks[:2])
    bench = Benchmark(bench.name, tasks, bench.num_classes, bench.input_shape, bench.class_names)
    ctx = make_context(ctx.backbone, bench, ctx.scenario)
    return bench, ctx, get_method(cfg["method"], ctx, **cfg.get(cfg["method"], {}))


def _grads(method, cl, batch, t=0):
    """The gradient of ``method``'s loss at ``cl`` on ``batch`` w.r.t. the trained tree (as the step takes it)."""
    batch = jax.tree.map(jnp.asarray, batch)
    return jax.grad(lambda tr: method.loss(with_trainable(cl, t, tr), batch, jax.random.PRNGKey(0), t)[0])(
        trainable(cl, t))


def _moves(before, after):
    """``{path: (after - before, max |before|)}`` over the trained tree."""
    return {p: (np.asarray(a) - np.asarray(b), float(np.abs(np.asarray(b)).max()))
            for p, b, a in zip(tree_paths(before), jax.tree.leaves(before), jax.tree.leaves(after))}


def _assert_moved(moves, grads, rate_of):
    """Each leaf moved by ``-rate_of(path) * g``, up to the float32 rounding of ``param + update``
    (a few ulps of the parameter's magnitude) and of the gradient (``rtol``), far below the move."""
    g = dict(zip(tree_paths(grads), map(np.asarray, jax.tree.leaves(grads))))
    assert set(moves) == set(g)
    for p, (d, mag) in moves.items():
        want = -rate_of(p) * g[p]
        atol = 4 * np.finfo(np.float32).eps * mag
        assert np.abs(want).max() > 100 * atol, p  # the move stands well above the rounding
        np.testing.assert_allclose(d, want, rtol=1e-3, atol=atol, err_msg=p)


def counting(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` with a count of its updates in its state: shows which optimizer a run used."""
    def init(params):
        return jnp.zeros((), jnp.int32), inner.init(params)

    def update(grads, state, params=None):
        updates, s = inner.update(grads, state[1], params)
        return updates, (state[0] + 1, s)

    return optax.GradientTransformation(init, update)


def test_fit_uses_the_users_optimizer_with_the_configs_per_partition_rates():
    """One SGD step per task: the head moves by exactly -lr*g, the backbone by -0.25*lr*g, and the
    user's optimizer (with its update count) is the one in the state at every task end."""
    cfg = quick_config("finetune", scenario="til", sets=["backbone.hidden=[8]", f"train.batch_size={N}",
                                                         "train.lr_scales=shared/backbone=0.25"])
    bench, ctx, method = _tiny(cfg)
    tcfg, lr = train_config(cfg), 0.3
    cl0 = method.init(jax.random.split(jax.random.PRNGKey(tcfg.seed))[1])  # fit's initial state
    x, y, tid = task_training_data(bench, 0, "til", False)
    batch = next(train_batches(x, y, N, np.random.default_rng([tcfg.seed, 0, 0]), tid))  # task 0's one batch
    seen = {}

    def on_task_end(t, ts, A):
        seen[t] = ts

    out = fit(method, ctx, bench, tcfg, progress=False, on_task_end=on_task_end, optimizer=counting(optax.sgd(lr)))
    assert out["timing"]["steps"] == 2
    for t in (0, 1):  # the user's counter (first in the chain, re-initialised per task) took the task's step
        assert int(seen[t].opt_state[0][0]) == 1
    moves = _moves(trainable(cl0, 0), trainable(seen[0].cl, 0))
    _assert_moved(moves, _grads(method, cl0, batch), lambda p: lr * (0.25 if p.startswith("shared/backbone") else 1))


def test_built_optimizer_scales_partitions_the_last_rule_winning_and_keeps_its_schedule():
    """The config's SGD with a step schedule: ``set_lr`` still sets the rate (the scales sit inside
    ``inject_hyperparams``); the backbone's kernel moves at 0.25x, its bias (a later rule) not at all."""
    cfg = quick_config("finetune", scenario="til", sets=["backbone.hidden=[8]"])
    _, ctx, method = _tiny(cfg)
    tcfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.2, lr_schedule="step:1:0.5",
                       lr_scales=["shared/backbone=0.25", "shared/backbone/fc0/bias=0"])
    tx = make_optimizer(tcfg, method)
    cl = method.init(jax.random.PRNGKey(0))
    ts = TrainState(cl, set_lr(tx.init(trainable(cl, 1)), 0.05), jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(0)
    batch = {"x": rng.random((8, 64), np.float32), "y": rng.integers(0, 2, 8).astype(np.int32),
             "tid": np.ones(8, np.int32)}
    ts1, _ = Steps(method, tx, "til").train_step(ts, jax.tree.map(jnp.asarray, batch), jnp.int32(1))
    scale = {"shared/backbone/fc0/kernel": 0.25, "shared/backbone/fc0/bias": 0.0}
    moves = _moves(trainable(cl, 1), trainable(ts1.cl, 1))
    np.testing.assert_array_equal(moves["shared/backbone/fc0/bias"][0], 0)
    del moves["shared/backbone/fc0/bias"]
    g = _grads(method, cl, batch, 1)
    g = {"shared": {"backbone": {"fc0": {"kernel": g["shared"]["backbone"]["fc0"]["kernel"]}}}, "task": g["task"]}
    _assert_moved(moves, g, lambda p: 0.05 * scale.get(p, 1.0))


def test_pah_state_holds_the_real_backbone_and_steps_it_at_its_scale():
    """PAH's stored backbone is its initialisation as it is and what the forward pass uses; its rate
    is ``backbone_lr_scale`` times the trainer's (the hypernetwork's is the trainer's)."""
    cfg = quick_config("pah", scenario="til", sets=["backbone.hidden=[8]", "pah.hidden=[4]",
                                                    "pah.backbone_lr_scale=0.2", "train.optimizer=sgd",
                                                    "train.momentum=0", "train.weight_decay=0", "train.lr=10"])
    _, ctx, method = _tiny(cfg)
    assert method.lr_scales == (("shared/backbone", 0.2),)
    key = jax.random.PRNGKey(0)
    cl = method.init(key)
    want = ctx.backbone.init(jax.random.split(key, 3)[0])[0]
    jax.tree.map(np.testing.assert_array_equal, cl.shared["backbone"], want)

    used = []
    apply = ctx.backbone.apply

    def recording(params, *a, **k):
        used.append(params)
        return apply(params, *a, **k)

    rec = pah(ctx._replace(backbone=ctx.backbone._replace(apply=recording)), **cfg["pah"])
    rec.predict(cl, jnp.zeros((3, 64)), jnp.zeros(3, jnp.int32))
    assert used
    jax.tree.map(np.testing.assert_array_equal, used[0], cl.shared["backbone"])

    tcfg = train_config(cfg)
    tx = make_optimizer(tcfg, method)
    rng = np.random.default_rng(0)
    batch = {"x": rng.random((8, 64), np.float32), "y": rng.integers(0, 2, 8).astype(np.int32),
             "tid": np.zeros(8, np.int32)}
    ts = TrainState(cl, tx.init(trainable(cl, 0)), jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
    ts1, _ = Steps(method, tx, "til").train_step(ts, jax.tree.map(jnp.asarray, batch), jnp.int32(0))
    moves = _moves(trainable(cl, 0), trainable(ts1.cl, 0))
    # (at task 0 PAH's own prototype step moves no prototype: they move by the trainer's step only)
    _assert_moved(moves, _grads(method, cl, batch), lambda p: tcfg.lr * (0.2 if p.startswith("shared/backbone") else 1))


def test_lr_scales_from_the_command_line_and_their_errors(tmp_path):
    base = default_config("finetune")
    cfg = apply_overrides(base, ["train.lr_scales=shared/backbone=0.5,task/head=2"])
    assert cfg["train"]["lr_scales"] == ["shared/backbone=0.5", "task/head=2"]
    assert apply_overrides(base, ['train.lr_scales=["a{1,2}=3"]'])["train"]["lr_scales"] == ["a{1,2}=3"]
    assert apply_overrides(base, ["backbone.hidden=16,32"])["backbone"]["hidden"] == [16, 32]
    validate(cfg)
    for bad, needle in [("nope", "train.lr_scales entry 'nope' must be REGEX=SCALE"),
                        ("a=-1", "SCALE must be a finite number >= 0"),
                        ("(=1", "is not a regular expression")]:
        with pytest.raises(ConfigError, match=needle):
            validate(apply_overrides(base, [f"train.lr_scales={bad}"]))
    # a pattern that selects nothing is refused where the optimizer state is made: before the workdir
    w = tmp_path / "w"
    with pytest.raises(ValueError, match="train.lr_scales: 'shared/bakbone' selects no trained parameter"):
        run(apply_overrides(base, ["train.lr_scales=shared/bakbone=0.5"]), workdir=str(w), progress=False)
    assert not w.exists()


def test_user_optimizer_errors_and_set_lr_without_hyperparams():
    with pytest.raises(ValueError, match="train.lr_schedule='cosine'"):
        make_optimizer(TrainConfig(lr_schedule="cosine"), optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        make_optimizer(TrainConfig(), optimizer="adam")
    state = optax.adam(0.1).init({"w": jnp.zeros(2)})
    assert set_lr(state, 0.5) is state  # no learning_rate hyperparameter: unchanged


def test_a_checkpoint_saved_before_lr_scales_resumes_except_a_method_with_its_own(monkeypatch):
    """An older config (no ``train.lr_scales``) reads as ``[]``; PAH's older state (a scaled backbone) is
    refused, naming the workdir and --fresh."""
    import copy
    from types import SimpleNamespace

    from clax import checkpoint as ckpt

    monkeypatch.setattr(ckpt, "restore_train_state", lambda raw, method, tx: "state")
    monkeypatch.setattr(ckpt, "progress_from", lambda state, meta: "progress")
    for name, own in (("finetune", ()), ("pah", (("shared/backbone", 0.1),))):
        cfg = default_config(name)
        saved = copy.deepcopy(cfg)
        del saved["train"]["lr_scales"]
        monkeypatch.setattr(ckpt, "latest_intact", lambda w, say=None, saved=saved: (1, {"train_state": {}}, saved, {}))
        method = SimpleNamespace(name=name, lr_scales=own)
        if own:
            with pytest.raises(ValueError, match="w holds a pah run saved before per-partition learning rates.*--fresh"):
                ckpt.load_resume("w", cfg, method, None)
        else:
            assert ckpt.load_resume("w", cfg, method, None) == ("state", "progress", [])


@pytest.mark.parametrize("method,sets", [("pah", ["pah.hidden=[4]", "train.lr_schedule=cosine"]), ("hnet", [])])
def test_compiled_optimizer_init_is_the_eager_one(method, sets):
    """Steps.opt_init (one compiled program) gives the state tx.init gives eagerly on task t's trainable
    tree: same structure, shapes, dtypes, weak types (what the compiled train step is traced for) and
    values (per-partition scales and an injected learning rate included)."""
    cfg = quick_config(method, scenario="til", sets=["backbone.hidden=[8]", *sets])
    bench, ctx, meth = _tiny(cfg)
    tx = make_optimizer(train_config(cfg), meth)
    cl = meth.init(jax.random.PRNGKey(0))
    want, got = tx.init(trainable(cl, 1)), Steps(meth, tx, "til").opt_init(cl, jnp.int32(1))
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert (a.shape, a.dtype, a.weak_type) == (b.shape, b.dtype, b.weak_type)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
