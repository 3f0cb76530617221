"""Train-step cost of the frozen-backbone methods beside plain steps of the same backbone.

* ``clr`` (reprogramming + per-task BatchNorm + head) vs. the same frozen ResNet-18 with a linear head
  (only the head trained: no backward pass through the backbone at all), vs. the frozen ResNet-18 with
  per-task BatchNorm + head (the backward pass CLR needs anyway), and vs. ``finetune`` (everything
  trained).
* ``soft_tf`` (masks on the last 3 blocks) vs. the plain ViT step (``finetune``: everything trained)
  and vs. the frozen ViT with a linear head.

Every step is the trainer's own compiled step (:class:`clax.train.Steps`) on one batch of 32 images
32x32x3; the figure is the median over ``--steps`` calls after a warm-up. Prints times and ratios.

    python benchmarks/frozen_step.py [--nf 20] [--steps 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from clax.data import get_benchmark
from clax.methods import get_method
from clax.methods.finetune import classifier_method
from clax.models import get_backbone
from clax.train import Steps, TrainConfig, TrainState, make_context, make_optimizer, trainable
from clax.transforms import classifier


def linear_probe(ctx):
    """The frozen backbone (BatchNorm in inference mode) with a trained linear head."""
    def init(key):
        return classifier.init(key, ctx, frozen_backbone=True)

    def loss(cl, batch, key, t):
        logits, _ = classifier.apply(cl, ctx, batch["x"], batch["tid"], train=False)
        ce = classifier.cross_entropy(logits, batch["y"])
        return ce, (cl.state, {"loss": ce})

    return classifier_method("probe", ctx, init=init, loss=loss)


def time_step(method, ctx, bench, n: int) -> float:
    """Median seconds of the compiled train step of ``method``."""
    tx = make_optimizer(TrainConfig(lr=1e-3))
    steps = Steps(method, tx, "til")
    cl = method.init(jax.random.PRNGKey(0))
    ts = TrainState(cl, tx.init(trainable(cl, 0)), jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
    task = bench.tasks[0]
    idx = np.arange(32) % len(task.y_train)
    batch = {"x": task.x_train[idx], "y": task.targets(task.y_train, "til")[idx], "tid": np.zeros(32, np.int32)}
    t = jnp.int32(0)
    for _ in range(3):
        ts, m = steps.train_step(ts, batch, t)
    jax.block_until_ready(ts)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ts, m = steps.train_step(ts, batch, t)
        jax.block_until_ready(ts)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--nf", type=int, default=20, help="ResNet-18 width (20 reduced, 64 full)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    bench = get_benchmark("split-digits", view="image")
    rows = []

    ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=args.nf), bench, "til")
    clr = get_method("clr", ctx, pretrained="none")
    bn_only = clr._replace(init=lambda k: (lambda cl: cl.replace(per_task={**cl.per_task, "reprogram": {}}))(
        clr.init(k)))
    r = {name: time_step(m, ctx, bench, args.steps) for name, m in
         (("clr", clr), ("probe", linear_probe(ctx)), ("bn+head", bn_only), ("finetune", get_method("finetune", ctx)))}
    rows.append((f"resnet18 nf={args.nf}", r, "clr"))

    ctx = make_context(get_backbone("vit", bench.input_shape, depth=3), bench, "til")
    soft = get_method("soft_tf", ctx, pretrained="none")
    r = {name: time_step(m, ctx, bench, args.steps) for name, m in
         (("soft_tf", soft), ("probe", linear_probe(ctx)), ("finetune", get_method("finetune", ctx)))}
    rows.append(("vit depth=3 dim=64", r, "soft_tf"))

    print(f"devices: {jax.devices()}; batch 32 of 32x32x3; median of {args.steps} steps")
    for name, r, main_key in rows:
        print(f"\n{name}")
        for k, v in r.items():
            ratio = "" if k == main_key else f"   {main_key}/{k} = {r[main_key] / v:.2f}"
            print(f"  {k:<9} {v * 1e3:8.2f} ms{ratio}")


if __name__ == "__main__":
    main()
