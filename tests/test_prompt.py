"""DualPrompt prefix prompts: the ViT's prefix attention against a numpy reference, the prompt
functions, and soft_tf with prompts (zero forgetting in TIL, key-matching task inference in CIL, bad
settings named)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from battery import assert_no_recompile_after_first_task, assert_zero_forgetting, quick_config, quick_run
from clax.methods.base import TaskData
from clax.models import get_backbone
from clax.models.vit import Attention, ViT
from clax.runner import build
from clax.transforms import prompt

TINY = ["backbone.dim=32", "backbone.heads=2", "soft_tf.pretrained=none"]
# the defaults G at [0, 1], E at [-3, -2, -1]: on the 3-block test ViT blocks 0 and 1 carry both
PROMPTS = TINY + ["soft_tf.prompts=true", "soft_tf.prompt_length=3"]


def numpy_attention(params, x, heads, prefix=None):
    """Multi-head attention of ``x [B, N, D]`` over ``[prefix_k; k]`` and ``[prefix_v; v]``, in numpy."""
    x = np.asarray(x, np.float64)
    b, n, d = x.shape
    hd = d // heads
    qkv = x @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])
    q, k, v = (qkv[..., i * d:(i + 1) * d] for i in range(3))
    if prefix is not None:
        pre = np.broadcast_to(np.asarray(prefix, np.float64), (b,) + prefix.shape[1:])
        k, v = np.concatenate([pre[:, 0], k], 1), np.concatenate([pre[:, 1], v], 1)
    split = lambda a: a.reshape(b, a.shape[1], heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, d)
    return out @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])


@pytest.mark.parametrize("batch_prefix", [1, 2])
def test_prefix_attention_matches_numpy_reference(batch_prefix):
    kx, kp, ki = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, 5, 8))
    prefix = jax.random.uniform(kp, (batch_prefix, 2, 3, 8), minval=-1, maxval=1)
    attn = Attention(dim=8, heads=2)
    params = attn.init(ki, x)["params"]
    got = attn.apply({"params": params}, x, prefix)
    np.testing.assert_allclose(got, numpy_attention(params, x, 2, prefix), atol=1e-5)
    np.testing.assert_allclose(attn.apply({"params": params}, x), numpy_attention(params, x, 2), atol=1e-5)
    with pytest.raises(ValueError, match="prefix must be"):
        attn.apply({"params": params}, x, prefix[:, :, :, :4])


def test_prompt_free_vit_is_unchanged_and_prompts_reach_the_chosen_blocks():
    bb = get_backbone("vit", (32, 32, 3), dim=32, heads=2, depth=3)
    params, _ = bb.init(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))
    run = jax.jit(lambda x, **kw: bb.apply(params, {}, x, False, **kw)[0])
    plain = np.asarray(run(x))
    for kw in ({"prompts": None}, {"prompts": {}}):
        np.testing.assert_array_equal(np.asarray(run(x, **kw)), plain)
    pr = prompt.init(jax.random.PRNGKey(3), 2, 32, 4, (0,), (2,))
    prompted = run(x, prompts=prompt.prefixes(pr["g"], pr["e"][0], (0,), (2,)))
    assert np.abs(np.asarray(prompted) - plain).max() > 1e-3
    last_only = jax.jit(bb.module.apply)({"params": params}, x, prompts={2: pr["e"][1, 0][None]})  # the module
    assert np.abs(np.asarray(last_only) - plain).max() > 1e-3
    with pytest.raises(ValueError, match="prompts for block 3, but the ViT has blocks 0..2"):
        bb.module.apply({"params": params}, x, prompts={3: pr["e"][1, 0][None]})
    assert isinstance(bb.module, ViT)


def test_prompt_init_prefixes_match_and_key_loss():
    pr = prompt.init(jax.random.PRNGKey(0), 4, 16, 5, (0, 1), (1, 2, 3))
    assert pr["g"].shape == (2, 2, 5, 16) and pr["e"].shape == (4, 3, 2, 5, 16) and pr["key"].shape == (4, 16)
    assert all(float(jnp.min(a)) >= -1 and float(jnp.max(a)) <= 1 and float(jnp.std(a)) > 0.5 for a in pr.values())
    pre = prompt.prefixes(pr["g"], pr["e"][2], (0, 1), (1, 2, 3))
    assert sorted(pre) == [0, 1, 2, 3]
    np.testing.assert_array_equal(pre[0], pr["g"][0][None])
    np.testing.assert_array_equal(pre[1], jnp.concatenate([pr["g"][1], pr["e"][2, 0]], axis=1)[None])  # G then E
    np.testing.assert_array_equal(pre[3], pr["e"][2, 2][None])
    keys = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    q = jnp.array([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.2]])
    np.testing.assert_array_equal(prompt.match(q, keys, jnp.array([True, True, False, True])), [0, 1, 3])
    # an untrained task never wins, even with the best key
    np.testing.assert_array_equal(prompt.match(q, keys, jnp.array([True, False, True, False])), [0, 2, 2])
    cos = np.array([2.0, 0.1]) @ np.array([0.6, 0.8]) / np.hypot(2.0, 0.1)
    assert float(prompt.key_loss(q[:1], jnp.array([0.6, 0.8]))) == pytest.approx(1 - cos, abs=1e-6)
    assert prompt.resolve_layers("x", [-3, -2, -1], 12) == (9, 10, 11)
    with pytest.raises(ValueError, match=r"x=\[9\]: layer 9 does not exist in a backbone of depth 3"):
        prompt.resolve_layers("x", [9], 3)


@pytest.fixture(scope="module")
def til():
    return quick_run("soft_tf", scenario="til", epochs=1, sets=PROMPTS, num_tasks=2)


def test_til_with_prompts_forgets_nothing(til):
    # task 0's logits depend on the G-prompts, so this also checks they are frozen after task 0
    assert_zero_forgetting(til)
    assert_no_recompile_after_first_task(til)
    assert np.mean(np.diag(til["accuracy_matrix"])) > 0.75, til["accuracy_matrix"]
    cl = til["state"].cl
    assert cl.shared["g_prompt"].shape == (2, 2, 3, 32)
    assert cl.per_task["e_prompt"].shape == (2, 3, 2, 3, 32) and cl.per_task["e_key"].shape == (2, 32)
    assert til["report"]["prompts"] == {"length": 3, "g_layers": [0, 1], "e_layers": [0, 1, 2],
                                        "g_prompt_tasks": "first"}
    # E-prompts and keys are float32 per-task rows: counted beside the int8 masks and the head
    masks, head = cl.per_task["mask"], cl.per_task["head"]
    n = sum(int(np.prod(v.shape[1:])) + 8 for v in masks.values())
    f32 = sum(int(np.prod(v.shape[1:])) * 4 for v in jax.tree.leaves([head, cl.per_task["e_prompt"],
                                                                      cl.per_task["e_key"]]))
    assert til["params"]["bytes_per_task"][0] == n + f32


def test_g_prompts_trained_in_every_task_change_earlier_tasks(til):
    """g_prompt_tasks=all (the authors' Table-I schedule): task 0 trains exactly as with "first" (same
    masks and head after the run), but task 1 moves the shared G-prompts, so task 0's logits change after
    its training: TIL zero forgetting no longer holds by construction."""
    out = quick_run("soft_tf", scenario="til", epochs=1, sets=PROMPTS + ["soft_tf.g_prompt_tasks=all"], num_tasks=2)
    first, every = til["state"].cl, out["state"].cl
    for k in ("mask", "head"):  # (to the last bits: the masked update compiles differently)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6), first.per_task[k],
                     every.per_task[k])
    assert float(jnp.max(jnp.abs(first.shared["g_prompt"] - every.shared["g_prompt"]))) > 1e-3
    np.testing.assert_allclose(out["logits_after_watch"], til["logits_after_watch"], rtol=1e-4, atol=1e-4)
    drift = float(np.max(np.abs(out["logits_final"] - out["logits_after_watch"])))
    assert drift > 1e-2, drift  # task 0's logits move while task 1 trains
    assert out["report"]["prompts"]["g_prompt_tasks"] == "all"


def test_g_prompts_may_have_their_own_length():
    """g_prompt_length (the authors' ImageNet-R config: G 5, E 20): G-prompts of that length; where a block
    has both, its prefix is G then E (``Lg + L`` tokens); the model runs with them."""
    pr = prompt.init(jax.random.PRNGKey(0), 3, 16, 4, (0, 1), (1, 2), g_length=2)
    assert pr["g"].shape == (2, 2, 2, 16) and pr["e"].shape == (3, 2, 2, 4, 16)
    pre = prompt.prefixes(pr["g"], pr["e"][0], (0, 1), (1, 2))
    assert {k: v.shape[2] for k, v in pre.items()} == {0: 2, 1: 6, 2: 4}
    np.testing.assert_array_equal(pre[1][0, :, :2], pr["g"][1])
    same = prompt.init(jax.random.PRNGKey(0), 3, 16, 4, (0, 1), (1, 2))  # g_length 0: the E-prompts' length
    np.testing.assert_array_equal(same["e"], pr["e"])
    bench, _, meth = build(quick_config("soft_tf", sets=PROMPTS + ["soft_tf.g_prompt_length=2"]))
    cl = meth.init(jax.random.PRNGKey(0))
    assert cl.shared["g_prompt"].shape == (2, 2, 2, 32) and cl.per_task["e_prompt"].shape[-2] == 3
    t = bench.tasks[0]
    logits = jax.jit(meth.predict)(cl, jnp.asarray(t.x_test[:4]), jnp.zeros(4, jnp.int32))
    assert np.all(np.isfinite(np.asarray(logits)))


def test_loss_adds_the_pull_constraint_and_a_new_task_starts_from_the_last_e_prompt():
    bench, ctx, meth = build(quick_config("soft_tf", scenario="cil", sets=PROMPTS + ["soft_tf.key_loss_weight=0.5"]))
    cl = meth.init(jax.random.PRNGKey(0))
    x = jnp.asarray(bench.tasks[1].x_train[:8])
    batch = {"x": x, "y": jnp.asarray(bench.tasks[1].targets(bench.tasks[1].y_train[:8], "cil")),
             "tid": jnp.ones(8, jnp.int32)}
    loss = jax.jit(lambda k: meth.loss(cl.replace(per_task={**cl.per_task, "e_key": k}), batch, jax.random.PRNGKey(0), 1))
    total, (_, m) = loss(cl.per_task["e_key"])
    q = jax.jit(ctx.backbone.apply)(cl.frozen["backbone"], {}, x)[0]  # the frozen model's CLS feature
    assert float(m["key_loss"]) == pytest.approx(float(prompt.key_loss(q, cl.per_task["e_key"][1])), abs=1e-6)
    assert float(total) == pytest.approx(float(m["ce"] + 0.5 * m["key_loss"]), abs=1e-6)
    g = jax.jit(jax.grad(lambda k: loss(k)[0]))(cl.per_task["e_key"])
    assert float(jnp.abs(g[1]).max()) > 0 and float(jnp.abs(g[0]).max()) == 0 and float(jnp.abs(g[2:]).max()) == 0
    cl1 = meth.begin_task(cl, TaskData(1, None, None, None, 32))
    np.testing.assert_array_equal(cl1.per_task["e_prompt"][1], cl.per_task["e_prompt"][0])
    np.testing.assert_array_equal(cl1.per_task["e_key"], cl.per_task["e_key"])  # keys are not copied
    np.testing.assert_array_equal(cl1.per_task["e_prompt"][2:], cl.per_task["e_prompt"][2:])


def test_cil_prompt_rule_is_reported_beside_the_others_and_keys_learn():
    out = quick_run("soft_tf", scenario="cil", epochs=1, sets=PROMPTS + ["soft_tf.task_inference=prompt"],
                    num_tasks=2)
    ti = out["report"]["task_inference"]
    assert ti["rule"] == "prompt" and set(ti["task_id_accuracy"]) == {"ncm", "entropy", "prompt"}
    A, sizes = out["accuracy_matrix"][-1], np.array([len(t.y_test) for t in out["bench"].tasks])
    assert ti["class_accuracy"]["prompt"] == pytest.approx(float(A @ sizes / sizes.sum()))
    meth, ctx, bench, cl = out["method"], out["ctx"], out["bench"], out["state"].cl
    frozen = jax.jit(ctx.backbone.apply)
    queries = [frozen(cl.frozen["backbone"], {}, jnp.asarray(t.x_train))[0] for t in bench.tasks]
    # training pulled each key towards its task's queries (the trainer initialises from split(PRNGKey(seed))[1])
    start = meth.init(jax.random.split(jax.random.PRNGKey(0))[1]).per_task["e_key"]
    for t, q in enumerate(queries):
        assert float(prompt.key_loss(q, cl.per_task["e_key"][t])) < float(prompt.key_loss(q, start[t])) - 0.03
    # one epoch does not bring the keys to their tasks' mean query (at chance here); with keys placed there,
    # the rule identifies the task (NCM over task means), so the query and the matching are the right ones
    means = jnp.stack([jnp.mean(q / jnp.linalg.norm(q, axis=1, keepdims=True), 0) for q in queries])
    at_means = cl.replace(per_task={**cl.per_task, "e_key": means})
    class_task = np.full(ctx.num_outputs, -1)
    for t in bench.tasks:
        class_task[np.asarray(t.classes)] = t.task_id
    pred = jax.jit(meth.predict)
    hits = [class_task[np.asarray(jnp.argmax(pred(at_means, jnp.asarray(t.x_test), None), -1))] == t.task_id
            for t in bench.tasks]
    assert np.mean(np.concatenate(hits)) > 0.7


@pytest.mark.parametrize("sets, match", [
    (["soft_tf.task_inference=prompt"], r"task_inference='prompt' \(key matching\) needs soft_tf.prompts=true"),
    (PROMPTS[3:] + ["soft_tf.e_prompt_layers=9,10,11"], r"soft_tf.e_prompt_layers=\[9, 10, 11\]: layer 9 does "
                                                        r"not exist in a backbone of depth 3"),
    (PROMPTS[3:] + ["soft_tf.g_prompt_layers=0,0"], r"soft_tf.g_prompt_layers=\[0, 0\]: layer 0 is given twice"),
    (PROMPTS[3:] + ["soft_tf.e_prompt_layers="], "soft_tf.e_prompt_layers must name at least one block"),
    (PROMPTS[3:] + ["soft_tf.prompt_length=0"], "soft_tf.prompt_length must be >= 1"),
    (PROMPTS[3:] + ["soft_tf.g_prompt_tasks=some"], "soft_tf.g_prompt_tasks must be one of first, all"),
    (PROMPTS[3:] + ["soft_tf.g_prompt_length=-1"], "soft_tf.g_prompt_length"),
])
def test_bad_prompt_settings_are_named(sets, match):
    with pytest.raises(ValueError, match=match):
        build(quick_config("soft_tf", sets=TINY + sets))


def test_soft_tf_with_prompts_in_cil_is_a_chain():
    _, _, meth = build(quick_config("soft_tf", scenario="cil", sets=PROMPTS + ["soft_tf.task_inference=prompt"]))
    assert meth.model.name == "soft_tf"
    assert [tr.name for tr in meth.transforms] == ["stored_masks", "prompts", "task_inference", "trained",
                                                   "pretrained"]
