"""Train steps on an accelerator: the backbones beside PyTorch, and every method beside its plain step
(issue 17, item 7).

Two parts, each timed in its own process (JAX and PyTorch would otherwise fight over the device's
memory), on whatever device JAX and PyTorch see first (a GPU when there is one):

1. **Backbones against PyTorch**, the same network, batch and Adam step in both:
   the reduced ResNet-18 (nf=20, 32x32x3, batch 64) and ViT-B/16 (224x224x3, batch 32, timm's
   ``vit_base_patch16_224`` on the PyTorch side), each a full fine-tuning step. For clax, the trainer's
   compiled step (``finetune``, TIL) and a plain Flax + optax step of the same network are both timed.
2. **Every method against its plain step** on the same backbone: the trainer's compiled step of each
   method at task 2 (``t = 1``, after ``begin_task``) over the median ``finetune`` step. ResNet-18 for
   the CNN methods (``clr`` reprograms it frozen), ViT-B/16 for ``soft_tf``.

Both sides use float32 with TF32 allowed in matrix products and convolutions (JAX's default on GPUs;
PyTorch is told ``allow_tf32``). The data are random arrays: only the shapes matter for the time.

    python benchmarks/gpu_steps.py                       # everything, a table and --json output
    python benchmarks/gpu_steps.py --only jax --quick    # tiny shapes, a smoke test on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from step_vs_torch import _median_time as _median  # noqa: E402  (one timer for the step benchmarks)

CNN_METHODS = ("finetune", "ewc", "si", "lwf", "replay", "derpp", "packnet", "wsn", "ibm", "hnet", "hembed", "pah",
               "clr")
VIT_METHODS = ("finetune", "soft_tf")
# name -> (backbone settings, image size, batch); --quick shrinks them for a CPU smoke test
SHAPES = {"resnet18": ({"name": "resnet18", "nf": 20}, 32, 64),
          "vit_b16": ({"name": "vit", "patch": 16, "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0}, 224, 32)}
QUICK = {"resnet18": ({"name": "resnet18", "nf": 4}, 32, 8),
         "vit_b16": ({"name": "vit", "patch": 16, "dim": 32, "depth": 3, "heads": 2, "mlp_ratio": 2.0}, 32, 4)}
CLASSES = 10


def _bench(size: int, n: int = 256):
    """A 2-task stream of random ``size x size x 3`` images, 10 classes a task."""
    import numpy as np

    from clax.data import Benchmark, Task

    rng = np.random.default_rng(0)
    tasks = []
    for t in range(2):
        cls = tuple(range(CLASSES * t, CLASSES * (t + 1)))
        x = rng.random((n, size, size, 3), np.float32)
        y = np.asarray(cls)[rng.integers(0, CLASSES, n)]
        tasks.append(Task(t, cls, x, y, x[:32], y[:32]))
    return Benchmark("random", tuple(tasks), 2 * CLASSES, (size, size, 3))


def method_step(method: str, backbone: dict, size: int, batch: int, iters: int) -> float:
    """Median seconds of the trainer's compiled step of ``method`` at task 2 (TIL) on ``backbone``."""
    from _timing import train_step_seconds

    from clax.config import default_config, train_config
    from clax.methods import get_method
    from clax.models import get_backbone
    from clax.train import make_context

    cfg = default_config(method)
    bench = _bench(size)
    bb = dict(backbone)
    ctx = make_context(get_backbone(bb.pop("name"), bench.input_shape, **bb), bench, "til")
    meth = get_method(method, ctx, **cfg[method]) if method in cfg else get_method(method, ctx)
    tc = train_config(cfg)
    return train_step_seconds(meth, bench, t=1, iters=iters, batch_size=batch, warmup=3, begin_task=True, cfg=tc)


def plain_step(backbone: dict, size: int, batch: int, iters: int) -> float:
    """Median seconds of a plain Flax + optax Adam step of the same network and one linear head."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from clax.models import get_backbone

    bb_cfg = dict(backbone)
    bb = get_backbone(bb_cfg.pop("name"), (size, size, 3), **bb_cfg)
    params, stats = bb.init(jax.random.PRNGKey(0))
    p = {"bb": params, "head": {"kernel": jnp.zeros((bb.feature_dim, CLASSES)), "bias": jnp.zeros(CLASSES)}}
    opt = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, size, size, 3), np.float32))
    y = jnp.asarray(rng.integers(0, CLASSES, batch), jnp.int32)

    @jax.jit
    def step(p, o, s):
        def loss(p):
            f, s2 = bb.apply(p["bb"], s, x, True)
            logits = f @ p["head"]["kernel"] + p["head"]["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s2
        (l, s2), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, s2, l

    st = {"p": p, "o": opt.init(p), "s": stats}

    def one():
        st["p"], st["o"], st["s"], l = step(st["p"], st["o"], st["s"])
        jax.block_until_ready(l)

    return _median(one, 3, iters)


def run_jax(quick: bool, iters: int, methods: bool) -> dict:
    import jax

    shapes = QUICK if quick else SHAPES
    out = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform, "jax": jax.__version__,
           "backbones": {}, "methods": {}}
    for name, (bb, size, batch) in shapes.items():
        out["backbones"][name] = {"plain_s": plain_step(bb, size, batch, iters),
                                  "clax_s": method_step("finetune", bb, size, batch, iters), "batch": batch,
                                  "size": size}
        if methods:
            for m in (CNN_METHODS if name == "resnet18" else VIT_METHODS):
                try:
                    out["methods"][f"{name}/{m}"] = method_step(m, bb, size, batch, iters)
                except Exception as e:  # one method failing must not lose the others' figures
                    out["methods"][f"{name}/{m}"] = f"error: {type(e).__name__}: {e}"[:300]
                print(f"  {name}/{m}: {out['methods'][f'{name}/{m}']}", file=sys.stderr, flush=True)
    return out


def run_torch(quick: bool, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    from step_vs_torch import torch_resnet18

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    shapes = QUICK if quick else SHAPES
    out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "backbones": {}}
    for name, (bb, size, batch) in shapes.items():
        torch.manual_seed(0)
        if name == "resnet18":
            net = torch_resnet18(bb["nf"], CLASSES)
        else:
            import timm

            net = timm.create_model("vit_base_patch16_224" if not quick else "vit_tiny_patch16_224",
                                    pretrained=False, num_classes=CLASSES, img_size=size)
        net = net.to(dev).train()
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        x = torch.rand(batch, 3, size, size, device=dev)
        y = torch.randint(0, CLASSES, (batch,), device=dev)

        def one():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()

        out["backbones"][name] = {"step_s": _median(one, 5, iters), "params": sum(p.numel() for p in net.parameters())}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["jax", "torch"], help="one side, printed as JSON (used by the full run)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the script, not a figure")
    ap.add_argument("--no-methods", action="store_true", help="only the backbones")
    ap.add_argument("--json", help="also write every figure to this file")
    a = ap.parse_args(argv)
    if a.only == "jax":
        print(json.dumps(run_jax(a.quick, a.iters, not a.no_methods)))
        return
    if a.only == "torch":
        print(json.dumps(run_torch(a.quick, a.iters)))
        return
    extra = ["--iters", str(a.iters)] + (["--quick"] if a.quick else []) + (["--no-methods"] if a.no_methods else [])
    res = {}
    for side in ("jax", "torch"):
        p = subprocess.run([sys.executable, __file__, "--only", side] + extra, capture_output=True, text=True)
        sys.stderr.write(p.stderr[-3000:] if p.returncode else "")
        res[side] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    j, t = res["jax"], res["torch"]
    if j is None:
        sys.exit("the JAX side failed (its error is above)")
    print(f"device: JAX {j['jax']} on {j['device']} ({j['platform']})"
          + (f"; PyTorch {t['torch']} on {t['device']}" if t else "; PyTorch side failed"))
    print(f"median of {a.iters} steps after warm-up, float32 (TF32 allowed), Adam")
    print("| backbone | batch | clax step ms | plain Flax ms | PyTorch ms | clax/PyTorch | plain/PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for name, b in j["backbones"].items():
        tp = t["backbones"][name]["step_s"] if t else float("nan")
        print(f"| {name} | {b['batch']} | {b['clax_s'] * 1e3:.2f} | {b['plain_s'] * 1e3:.2f} | {tp * 1e3:.2f} | "
              f"{b['clax_s'] / tp:.2f}x | {b['plain_s'] / tp:.2f}x |")
    if j["methods"]:
        print("\n| backbone / method | step ms | / finetune step |")
        print("|---|---|---|")
        for key, s in j["methods"].items():
            base = j["methods"].get(key.split("/")[0] + "/finetune")
            if isinstance(s, str):
                print(f"| {key} | {s} | |")
            else:
                print(f"| {key} | {s * 1e3:.2f} | {s / base:.2f}x |" if isinstance(base, float) else f"| {key} | "
                      f"{s * 1e3:.2f} | |")


if __name__ == "__main__":
    main()
