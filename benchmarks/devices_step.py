"""Step time against the number of devices of the data axis (data parallelism through clax.mesh).

Forces 8 host CPU devices (``XLA_FLAGS``, set here before JAX starts unless already set) and times the
trainer's compiled step of finetune on split-digits (TIL) with the batch split over 1, 2, 4 and 8 of
them; the state replicated. On a machine with 2 cores, 8 "devices" share those cores, so the figures
show the overhead of the split (the all-reduce of the gradients, smaller per-device work), not a
speedup; on GPUs or TPUs each device is real hardware.

    python benchmarks/devices_step.py                      # MLP [256, 256], batch 32
    python benchmarks/devices_step.py --backbone resnet18 --nf 8 --iters 10
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def step_seconds(n: int, backbone: str, nf: int, iters: int, batch: int) -> float:
    """Median seconds of the compiled finetune step with the batch split over ``n`` devices."""
    import jax

    from clax import mesh as M
    from clax.config import apply_overrides, default_config, train_config
    from clax.runner import build

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import train_step_seconds

    cfg = default_config("finetune")
    cfg["train"]["batch_size"] = batch
    if backbone != "mlp":
        cfg = apply_overrides(cfg, [f"backbone.name={backbone}", f"backbone.nf={nf}"])
    bench, _, meth = build(cfg)
    return train_step_seconds(meth, bench, iters=iters, batch_size=batch, cfg=train_config(cfg),
                              mesh=M.make_mesh(n, 1, jax.devices()[:n]))


def main(argv=None):
    p = argparse.ArgumentParser(description="finetune step time vs the devices of the data axis")
    p.add_argument("--backbone", default="mlp", choices=["mlp", "resnet18"])
    p.add_argument("--nf", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    a = p.parse_args(argv)
    import jax

    base = None
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; finetune, {a.backbone}"
          f"{'' if a.backbone == 'mlp' else f' nf={a.nf}'}, batch {a.batch}, median of {a.iters} steps")
    print(f"{'devices':>8} {'ms':>9} {'x 1 device':>11}")
    for n in a.devices:
        s = step_seconds(n, a.backbone, a.nf, a.iters, a.batch)
        base = base or s
        print(f"{n:>8} {s * 1e3:9.3f} {s / base:11.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
