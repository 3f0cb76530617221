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
import os
import sys

import jax

from clax.compose import chain
from clax.data import get_benchmark
from clax.methods import get_method
from clax.models import get_backbone, step_options
from clax.train import make_context
from clax.transforms import classifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import train_step_seconds  # noqa: E402


def linear_probe(ctx):
    """The frozen backbone (BatchNorm in inference mode) with a trained linear head."""
    model = classifier.model(ctx, frozen_backbone=True, name="probe")
    frozen_bn = model._replace(forward=lambda cl, x, tid, t, train, key: model.forward(cl, x, tid, t, False, key))
    return chain(frozen_bn, name="probe")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--nf", type=int, nargs="+", default=[20], help="ResNet-18 widths (20 reduced, 64 full)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    bench = get_benchmark("split-digits", view="image")
    rows = []
    for nf in args.nf:
        ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=nf), bench, "til")
        clr = get_method("clr", ctx, pretrained="none")
        bn_only = clr._replace(init=lambda k, clr=clr: (lambda cl: cl.replace(
            per_task={**cl.per_task, "reprogram": {}}))(clr.init(k)))
        opts = step_options(ctx.backbone)  # as clax.train.fit compiles the steps
        r = {name: train_step_seconds(m, bench, iters=args.steps, compiler_options=opts) for name, m in
             (("clr", clr), ("probe", linear_probe(ctx)), ("bn+head", bn_only),
              ("finetune", get_method("finetune", ctx)))}
        rows.append((f"resnet18 nf={nf}", r, "clr", ("bn+head", "probe")))

    ctx = make_context(get_backbone("vit", bench.input_shape, depth=3), bench, "til")
    soft = get_method("soft_tf", ctx, pretrained="none")
    r = {name: train_step_seconds(m, bench, iters=args.steps) for name, m in
         (("soft_tf", soft), ("probe", linear_probe(ctx)), ("finetune", get_method("finetune", ctx)))}
    rows.append(("vit depth=3 dim=64", r, "soft_tf", None))

    print(f"devices: {jax.devices()}; batch 32 of 32x32x3; median of {args.steps} steps")
    for name, r, main_key, floor in rows:
        print(f"\n{name}")
        for k, v in r.items():
            ratio = "" if k == main_key else f"   {main_key}/{k} = {r[main_key] / v:.2f}"
            print(f"  {k:<9} {v * 1e3:8.2f} ms{ratio}")
        if floor:  # what any method that back-propagates through the whole backbone pays over a probe
            print(f"  floor: {floor[0]}/{floor[1]} = {r[floor[0]] / r[floor[1]]:.2f} "
                  f"(the backward pass through the frozen backbone, without reprogramming)")


if __name__ == "__main__":
    main()
