"""Test helper for the parameter-isolation methods (wsn, packnet, ibm): a short run that records,
after every task, the shared weights, the consolidated union and the old task's test logits."""
from __future__ import annotations

import jax
import numpy as np

from battery import quick_config, task_logits
from clax.config import train_config
from clax.methods import get_method
from clax.runner import build
from clax.train import fit, make_context

SMALL = ("backbone.hidden=[64,64]", "train.lr=3e-3")


def isolation_run(method: str, benchmark: str = "split-digits", epochs: int = 2, sets=SMALL,
                  num_tasks: int = 3, cfg: dict | None = None) -> dict:
    """Runs ``method`` (TIL) on the first ``num_tasks`` tasks; ``out["snapshots"][t]`` holds numpy
    copies of ``weights`` and ``consolidated`` after task ``t``, ``out["logits"][t]`` task 0's logits.
    A full config ``cfg`` (e.g. an experiment's ``get_config()``) replaces the other arguments."""
    cfg = cfg or quick_config(method, benchmark, "til", epochs, sets)
    method = cfg["method"]
    bench, ctx, meth = build(cfg)
    bench = type(bench)(bench.name, bench.tasks[:num_tasks], bench.num_classes, bench.input_shape)
    ctx = make_context(ctx.backbone, bench, "til")
    meth = get_method(method, ctx, **cfg[method])
    snaps, logits = [], []

    def on_task_end(t, ts, A):
        snaps.append({"weights": jax.tree.map(np.asarray, ts.cl.shared["weights"]),
                      "consolidated": jax.tree.map(np.asarray, ts.cl.extra["consolidation"])})
        logits.append(task_logits(meth, ctx, ts.cl, bench.tasks[0], "til"))

    out = fit(meth, ctx, bench, train_config(cfg), progress=False, on_task_end=on_task_end)
    out.update(snapshots=snaps, logits=logits, method=meth, ctx=ctx, bench=bench, cfg=cfg)
    return out


def assert_isolation(out: dict) -> None:
    """Zero forgetting bit-for-bit (task 0's logits after every later task), BWT exactly 0, weights
    consolidated after task t unchanged through every later task, and no recompilation per task."""
    for later in out["logits"][1:]:
        np.testing.assert_array_equal(out["logits"][0], later)
    assert out["bwt"] == 0.0, out["bwt"]
    snaps = out["snapshots"]
    for t, s in enumerate(snaps):
        for u in snaps[t + 1:]:
            for w0, c0, w1 in zip(jax.tree.leaves(s["weights"]), jax.tree.leaves(s["consolidated"]),
                                  jax.tree.leaves(u["weights"])):
                np.testing.assert_array_equal(w0[c0], w1[c0])
    counts = out["timing"]["compiles_after_task"]
    assert all(c == counts[0] for c in counts), counts


def assert_capacity(out: dict) -> None:
    """``mask_density`` and ``capacity_used`` per task, in (0, 1], capacity non-decreasing and at least
    each task's density."""
    d, c = out["report"]["mask_density"], out["report"]["capacity_used"]
    T = len(out["snapshots"])
    assert len(d) == len(c) == T
    assert all(0 < x <= 1 for x in d + c)
    assert all(b >= a for a, b in zip(c, c[1:])) and all(cu >= de - 1e-12 for cu, de in zip(c, d))
    # the union recorded after each task is what capacity_used reports
    for t, s in enumerate(out["snapshots"]):
        leaves = jax.tree.leaves(s["consolidated"])
        assert abs(sum(int(x.sum()) for x in leaves) / sum(x.size for x in leaves) - c[t]) < 1e-12
