"""Finetune train step of reduced ResNet-18 (nf=20, batch 64, 32x32x3, Adam) in clax beside PyTorch.

Prints the median step time of: the clax trainer's compiled step, a plain Flax/optax step of the same
network (to see what the continual-learning machinery costs), and the same step in PyTorch on the
CPU; then the same clax step under other XLA CPU settings, each in a fresh process.

The trainer's step and the forward pass compile as :func:`clax.train.fit` compiles them, with
:func:`clax.models.step_options` (on the CPU, XLA's own convolutions instead of YNNPACK's for this
width); the plain step with XLA's default options, so ``clax/plain`` also shows what those options do.

    python benchmarks/step_vs_torch.py              # everything (needs torch for the PyTorch line)
    python benchmarks/step_vs_torch.py --only clax  # one measurement (used for the XLA variants)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH, NF, CLASSES = 64, 20, 10


def _median_time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clax_step(iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from clax.config import apply_overrides, default_config, train_config
    from clax.models import step_options
    from clax.runner import build
    from clax.train import Steps, TrainState, make_optimizer, trainable

    cfg = apply_overrides(default_config("finetune"), ["scenario=cil", "backbone.name=resnet18", f"backbone.nf={NF}"])
    _, ctx, method = build(cfg)
    tx = make_optimizer(train_config(cfg))
    steps = Steps(method, tx, "cil", step_options(ctx.backbone))  # as clax.train.fit compiles it
    cl = method.init(jax.random.PRNGKey(0))
    ts = TrainState(cl, tx.init(trainable(cl, 0)), jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.random((BATCH, 32, 32, 3), np.float32)),
             "y": jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32), "tid": jnp.zeros(BATCH, jnp.int32)}
    t = jnp.int32(0)
    state = {"ts": ts}

    def one():
        state["ts"], m = steps.train_step(state["ts"], batch, t)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    one()
    compile_s = time.perf_counter() - t0
    clax_s = _median_time(one, 3, iters)

    # The same network and optimizer as a plain Flax + optax step, no partitions.
    bb = ctx.backbone
    params, stats = bb.init(jax.random.PRNGKey(0))
    head = {"kernel": jnp.zeros((bb.feature_dim, CLASSES)), "bias": jnp.zeros(CLASSES)}
    p = {"bb": params, "head": head}
    opt = optax.adam(1e-3)
    o = opt.init(p)

    @jax.jit
    def plain(p, o, stats, x, y):
        def loss(p):
            f, s = bb.apply(p["bb"], stats, x, True)
            logits = f @ p["head"]["kernel"] + p["head"]["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s
        (l, s), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, s, l

    pst = {"p": p, "o": o, "s": stats}

    def one_plain():
        pst["p"], pst["o"], pst["s"], l = plain(pst["p"], pst["o"], pst["s"], batch["x"], batch["y"])
        jax.block_until_ready(l)

    plain_s = _median_time(one_plain, 3, iters)

    fwd = jax.jit(lambda p, s, x: bb.apply(p["bb"], s, x, False)[0], compiler_options=step_options(bb))  # as eval

    def one_fwd():
        jax.block_until_ready(fwd(pst["p"], pst["s"], batch["x"]))

    fwd_s = _median_time(one_fwd, 3, iters)
    return {"clax_step_s": clax_s, "plain_step_s": plain_s, "forward_s": fwd_s, "compile_s": compile_s,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


def torch_resnet18(nf: int, classes: int):
    """The reduced ResNet-18 (3x3 stem, widths nf..8nf, global average pool, linear head) in PyTorch."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.short is None else self.short(x)))

    class Net(nn.Module):
        def __init__(self, nf):
            super().__init__()
            self.conv1 = nn.Conv2d(3, nf, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(nf)
            layers, cin = [], nf
            for i, w in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
                for j in range(2):
                    layers.append(Block(cin, w, 2 if i > 0 and j == 0 else 1))
                    cin = w
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            return self.fc(self.layers(x).mean((2, 3)))

    return Net(nf)


def torch_step(iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = torch_resnet18(NF, CLASSES)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.rand(BATCH, 3, 32, 32)
    y = torch.randint(0, CLASSES, (BATCH,))

    def one():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    net.eval()

    def fwd():
        with torch.no_grad():
            net(x)

    fwd_s = _median_time(fwd, 3, iters)
    net.train()
    return {"torch_step_s": _median_time(one, 3, iters), "torch_forward_s": fwd_s, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


VARIANTS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "no-eigen-threads": "--xla_cpu_multi_thread_eigen=false",
    "fast-math": "--xla_cpu_enable_fast_math=true",
    "xnnpack+onednn": "--xla_cpu_use_xnnpack=true --xla_cpu_use_onednn=true",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["clax", "torch"])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if args.only == "clax":
        print(json.dumps(clax_step(args.iters)))
        return
    if args.only == "torch":
        print(json.dumps(torch_step(args.iters)))
        return
    try:
        tr = torch_step(args.iters)
    except ImportError:
        tr = None
        print("torch not installed: `pip install torch==2.13.0` for the PyTorch line")
    rows = {}
    for name, flags in VARIANTS.items():
        env = {**os.environ, "XLA_FLAGS": flags}
        out = subprocess.run([sys.executable, __file__, "--only", "clax", "--iters", str(args.iters)], env=env,
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
    base = rows["default"]
    print(f"reduced ResNet-18 (nf={NF}) finetune train step, batch {BATCH}, 32x32x3, Adam; median of {args.iters}")
    print(f"  clax trainer step      {base['clax_step_s'] * 1e3:8.1f} ms   (first call incl. compile {base['compile_s']:.1f} s)")
    print(f"  plain flax+optax step  {base['plain_step_s'] * 1e3:8.1f} ms   clax/plain = {base['clax_step_s'] / base['plain_step_s']:.2f}")
    if tr:
        print(f"  PyTorch {tr['torch']} step  {tr['torch_step_s'] * 1e3:8.1f} ms   ({tr['torch_threads']} threads)")
        print(f"  ratio clax/PyTorch      {base['clax_step_s'] / tr['torch_step_s']:.2f}  (train step)")
        print(f"  forward only (eval)    clax {base['forward_s'] * 1e3:.1f} ms, PyTorch {tr['torch_forward_s'] * 1e3:.1f} ms, "
              f"ratio {base['forward_s'] / tr['torch_forward_s']:.2f}")
    for name, r in rows.items():
        if name != "default":
            print(f"  XLA_FLAGS={VARIANTS[name]:<55} clax {r['clax_step_s'] * 1e3:8.1f} ms  "
                  f"vs default {r['clax_step_s'] / base['clax_step_s']:.2f}x, forward {r['forward_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
