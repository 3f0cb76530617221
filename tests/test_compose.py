"""clax.compose: the transform battery every transform passes, joins with '+', refusals, SI and DER++.

The battery (one fit per transform and scenario on tiny split-digits, 2 tasks, 1 epoch): the transform's
state lives under its own name only and the model's partitions are the classifier's; it trains with
finite named terms in TIL and CIL; a task switch adds no compilation; the trained state survives an
Orbax checkpoint round-trip bit for bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from battery import tiny_digits
from clax import checkpoint as ckpt
from clax import Transform, chain, join
from clax.compose import state, with_state
from clax.methods import get_method
from clax.models import get_backbone
from clax.train import TrainConfig, fit, make_context, make_optimizer
from clax.transforms import classifier, distill, penalty, rehearsal

BENCH = tiny_digits(num_tasks=2, n_train=48, n_test=40)
CFG = TrainConfig(epochs=1, batch_size=16, eval_batch_size=64)


def ctx_of(scenario):
    return make_context(get_backbone("mlp", BENCH.input_shape, hidden=[16]), BENCH, scenario)


def transforms_of(ctx):
    """Every shared transform the baselines compose, with its own loss terms."""
    return {
        "replay": (rehearsal.replay(32, ctx.input_shape), {"replay"}),
        "derpp": (rehearsal.derpp(32, ctx.input_shape, ctx.num_outputs), {"der", "der_ce"}),
        "lwf": (distill.lwf(ctx), {"kd"}),
        "ewc": (penalty.ewc(10.0, 16), {"ewc"}),
        "si": (penalty.si(), {"si"}),
        "joint": (Transform("joint", cumulative=True), set()),
    }


_RUNS: dict = {}


def battery_run(name, scenario):
    if (name, scenario) not in _RUNS:
        ctx = ctx_of(scenario)
        tr, terms = transforms_of(ctx)[name]
        m = chain(classifier.model(ctx), tr)
        _RUNS[name, scenario] = (m, ctx, terms, fit(m, ctx, BENCH, CFG, progress=False))
    return _RUNS[name, scenario]


NAMES = ["replay", "derpp", "lwf", "ewc", "si", "joint"]


@pytest.mark.parametrize("scenario", ["til", "cil"])
@pytest.mark.parametrize("name", NAMES)
def test_battery(name, scenario, tmp_path):
    m, ctx, terms, out = battery_run(name, scenario)
    plain = classifier.model(ctx).init(jax.random.PRNGKey(3))
    cl0 = m.init(jax.random.PRNGKey(3))
    # namespaced: the transform adds its own entry to extra, the model's partitions are untouched
    assert set(cl0.extra) <= {name}
    for part in ("frozen", "shared", "per_task", "state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(cl0, part), getattr(plain, part))
    # composes with the classifier: finite loss and its own named terms
    for row in out["history"]:
        assert np.isfinite(row["loss"]) and terms <= set(row), (name, row)
    assert np.all(np.isfinite(np.diag(out["accuracy_matrix"])))
    # a task switch does not recompile the step
    c = out["timing"]["compiles_after_task"]
    assert c[0] == c[1], c
    # checkpoint round-trip
    ts = out["state"]
    mngr = ckpt.manager(str(tmp_path))
    ckpt.save(mngr, 1, ts, out["accuracy_matrix"], 1, {"method": name})
    raw, _ = ckpt.restore_raw(str(tmp_path))
    back = ckpt.restore_train_state(raw["train_state"], m, make_optimizer(CFG, m))
    jax.tree.map(np.testing.assert_array_equal, back.cl, ts.cl)


def test_transform_state_is_namespaced_when_composed():
    """Two transforms with state keep it apart: each hook reads and writes only its own entry."""
    ctx = ctx_of("cil")
    m = join(get_method("replay", ctx), get_method("lwf", ctx), get_method("ewc", ctx))
    cl = m.init(jax.random.PRNGKey(0))
    assert set(cl.extra) == {"replay", "lwf", "ewc"}
    out = fit(m, ctx, BENCH, CFG, progress=False)
    st = out["state"].cl.extra
    assert int(st["replay"]["seen"]) == 2 * 48                          # replay's reservoir saw both tasks
    assert any(float(jnp.abs(f).sum()) > 0 for f in jax.tree.leaves(st["ewc"]["fisher"]))
    assert {"ce", "replay", "kd", "ewc"} <= set(out["history"][-1])


def test_user_transform_in_under_30_lines():
    """The README's example: an L2 pull towards the last task's weights, written as a transform."""
    def l2_anchor(strength=1.0, name="l2"):
        def loss(cl, view, batch, key, t):
            sq = jax.tree.map(lambda p, a: jnp.sum((p - a) ** 2), cl.shared, state(cl, name))
            reg = jnp.where(t > 0, strength * sum(jax.tree.leaves(sq)), 0.0)  # no anchor in task 0
            return reg, {"l2": reg}

        return Transform(name, init=lambda key, cl: cl.shared, loss=loss,
                         end_task=lambda cl, data: with_state(cl, name, cl.shared))

    ctx = ctx_of("til")
    strong = fit(chain(classifier.model(ctx), l2_anchor(1e3)), ctx, BENCH, CFG, progress=False)
    plain = fit(chain(classifier.model(ctx)), ctx, BENCH, CFG, progress=False)
    assert strong["history"][-1]["l2"] > 0 and strong["history"][0]["l2"] == 0
    drift = lambda o: sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
        jax.tree.leaves(o["state"].cl.shared), jax.tree.leaves(plain["state"].cl.shared)))
    assert drift(strong) > 0  # the pull changed training


def test_si_accumulates_minus_gradient_times_update():
    """SI's path integral from the step's gradient and update: omega = -sum_steps g * delta."""
    ctx = ctx_of("til")
    m = chain(classifier.model(ctx), penalty.si(c=0.0))
    cl = m.init(jax.random.PRNGKey(0))
    g = jax.tree.map(lambda p: jnp.full_like(p, 2.0), {"shared": cl.shared, "task": {}})
    u = jax.tree.map(lambda p: jnp.full_like(p, -0.5), {"shared": cl.shared, "task": {}})
    cl2 = m.on_update(m.on_update(cl, g, u, 0), g, u, 0)
    for w in jax.tree.leaves(cl2.extra["si"]["omega"]):
        np.testing.assert_array_equal(w, np.full(w.shape, 2.0, np.float32))  # 2 * -(2 * -0.5)
    # end of task: Omega += omega / (delta^2 + xi), with delta the change since the anchor
    moved = cl2.replace(shared=jax.tree.map(lambda p: p + 0.1, cl2.shared))
    from clax.methods.base import TaskData
    done = m.end_task(moved, TaskData(0, BENCH.tasks[0].x_train, BENCH.tasks[0].y_train, jax.random.PRNGKey(0), 16))
    for imp in jax.tree.leaves(done.extra["si"]["importance"]):
        np.testing.assert_allclose(imp, 2.0 / (0.1**2 + 1e-3), rtol=1e-3)
    assert all(float(jnp.abs(w).max()) == 0 for w in jax.tree.leaves(done.extra["si"]["omega"]))


def test_si_trains_with_one_backward_pass():
    """SI's step has the compile count and metrics of any method: its importance grows during a task."""
    ctx = ctx_of("til")
    out = fit(get_method("si", ctx), ctx, BENCH, CFG, progress=False)
    imp = out["state"].cl.extra["si"]["importance"]
    assert sum(float(jnp.sum(jnp.abs(i))) for i in jax.tree.leaves(imp)) > 0
    assert out["history"][-1]["si"] > 0  # task 2 is anchored to task 1


def test_derpp_stores_the_models_logits():
    ctx = ctx_of("cil")
    m = get_method("derpp", ctx, buffer_size=20)
    out = fit(m, ctx, BENCH, CFG, progress=False)
    buf = out["state"].cl.extra["derpp"]
    # the stored rows of task 1 hold the model's test-time logits of those inputs after task 1
    cl = out["state"].cl
    last = np.asarray(buf["tid"]) == 1
    assert last.any()
    again = np.asarray(jax.jit(m.predict)(cl, buf["x"][last], None))
    np.testing.assert_allclose(np.asarray(buf["logits"])[last], again, rtol=1e-5, atol=1e-5)


def test_replay_plus_lwf_in_cil_learns_every_task():
    """The combination that silenced rehearsal before: every task is learned (diagonal above chance)."""
    bench = tiny_digits(num_tasks=2, n_train=200, n_test=60)
    ctx = make_context(get_backbone("mlp", bench.input_shape, hidden=[64]), bench, "cil")
    out = fit(get_method("replay+lwf", ctx), ctx, bench, TrainConfig(epochs=3, batch_size=16, lr=3e-3),
              progress=False)
    assert np.all(np.diag(out["accuracy_matrix"]) > 0.6), out["accuracy_matrix"]
    assert {"ce", "replay", "kd"} <= set(out["history"][-1])


@pytest.mark.parametrize("name, scenario, words", [
    ("wsn+replay", "cil", ["wsn", "til", "cil"]),
    ("hnet+pah", "til", ["hnet", "pah", "both own"]),
    ("replay+replay", "til", ["twice"]),
    ("wsn+replay", "til", ["replay mixes stored samples", "wsn runs one task's network"]),
    ("hnet+derpp", "til", ["derpp mixes stored samples", "hnet runs one task's network"]),
    ("replay+nosuch", "til", ["nosuch", "valid"]),
])
def test_impossible_combinations_are_refused_naming_the_parts(name, scenario, words):
    ctx = ctx_of(scenario)
    with pytest.raises(ValueError) as e:
        get_method(name, ctx)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_two_transforms_owning_one_resource_are_refused():
    ctx = ctx_of("cil")
    a = Transform("a", owns=("task_inference",))
    b = Transform("b", owns=("task_inference",))
    with pytest.raises(ValueError, match="a and b both own the task inference"):
        chain(classifier.model(ctx), a, b)


def test_every_registered_method_is_a_chain_with_its_state_under_its_parts_names():
    """Every method of the registry (and the joins the issue names) is a chain: a model and transforms,
    and every entry of ``cl.extra`` belongs to one of its transforms (shapes only: nothing compiles)."""
    from clax.config import default_config
    from clax.methods import METHODS
    from clax.runner import build

    names = [(n, sc) for n, spec in METHODS.items() for sc in spec.scenarios]
    names += [("replay+lwf", "cil"), ("ewc+hnet", "til"), ("soft_tf+replay", "cil")]
    for name, scenario in names:
        cfg = default_config(name)
        cfg["scenario"] = scenario
        for part in name.split("+"):
            if "pretrained" in cfg[part]:
                cfg[part]["pretrained"] = "none"
        _, ctx, m = build(cfg)
        assert m.model is not None, name
        cl = jax.eval_shape(m.init, jax.random.PRNGKey(0))
        own = {tr.name for tr in m.transforms}
        assert set(cl.extra) <= own, (name, sorted(cl.extra), sorted(own))


def test_scalar_tid_models_get_t_only_when_every_row_is_the_tasks():
    """A model with ``scalar_tid`` gets the scalar ``t`` as ``tid`` where no transform adds rows and
    training is not cumulative; with rehearsal rows or cumulative training, the rows' own ``[N]`` ids."""
    ctx = ctx_of("til")
    base = classifier.model(ctx)
    seen = []

    def forward(cl, x, tid, t, train, key):
        seen.append(tuple(jnp.shape(tid)))  # at trace time
        return base.forward(cl, x, jnp.broadcast_to(tid, x.shape[:1]), t, train, key)

    probe = base._replace(forward=forward, scalar_tid=True)
    batch = {"x": jnp.zeros((4,) + tuple(ctx.input_shape)), "y": jnp.zeros(4, jnp.int32),
             "tid": jnp.zeros(4, jnp.int32)}
    t = jnp.int32(0)
    for parts, want in [((), ()), ((transforms_of(ctx)["replay"][0],), (8,)),
                        ((transforms_of(ctx)["joint"][0],), (4,)), ((distill.lwf(ctx),), ())]:
        m = chain(probe, *parts)
        cl = m.init(jax.random.PRNGKey(0))
        seen.clear()
        jax.make_jaxpr(lambda cl: m.loss(cl, batch, jax.random.PRNGKey(1), t))(cl)
        assert seen[0] == want, ([p.name for p in parts], seen)  # chain's call (LwF's teacher calls again)
    seen.clear()  # a model without the flag always gets the rows' ids
    jax.make_jaxpr(lambda cl: chain(base._replace(forward=forward)).loss(cl, batch, jax.random.PRNGKey(1), t))(cl)
    assert seen[0] == (4,)


def test_eval_step_gives_scalar_tid_models_the_task_itself():
    """The trainer's TIL eval step passes ``t`` as ``tid`` to a model with ``scalar_tid`` (its batch is one
    task's), ``[B]`` ids to any other; CIL passes None."""
    from clax.train import Steps

    seen = []
    for scenario in ("til", "cil"):
        ctx = ctx_of(scenario)
        base = classifier.model(ctx)

        def predict(cl, x, tid, base=base):
            seen.append(None if tid is None else tuple(jnp.shape(tid)))
            return base.predict(cl, x, None if tid is None else jnp.broadcast_to(tid, x.shape[:1]))

        batch = {"x": jnp.zeros((4,) + tuple(ctx.input_shape)), "y": jnp.zeros(4, jnp.int32), "w": jnp.ones(4)}
        for flag in (True, False):
            m = chain(base._replace(predict=predict, scalar_tid=flag))
            seen.clear()
            jax.make_jaxpr(Steps(m, make_optimizer(CFG, m), scenario).eval_step)(
                m.init(jax.random.PRNGKey(0)), batch, jnp.int32(1))
            assert seen == [() if flag and scenario == "til" else (4,) if scenario == "til" else None], \
                (scenario, flag, seen)
