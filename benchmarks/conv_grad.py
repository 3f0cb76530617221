"""Where the reduced ResNet-18's CPU backward pass goes (issue 17, item 5): each 3x3 convolution of the
network (batch 64, NHWC, the four stages' shapes) timed as XLA compiles it, forward, input gradient and
weight gradient, beside two rewrites of the weight gradient as matrix products (what a custom VJP could
use): ``patches`` (``conv_general_dilated_patches`` then one matmul) and ``shifted`` (nine shifted
matmuls). With ``--torch-python`` the same convolutions in PyTorch (oneDNN) in another interpreter.

    python benchmarks/conv_grad.py [--iters 15] [--torch-python /path/to/python-with-torch]

Every figure is the median of ``--iters`` calls after a warm-up, in ms; the ratios are to the same
layer's forward pass in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

#: (spatial size, input channels, output channels) of the reduced ResNet-18's 3x3 stride-1 convolutions
LAYERS = ((32, 20, 20), (16, 40, 40), (8, 80, 80), (4, 160, 160))
BATCH = 64


def _median_ms(fn, iters: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (step_vs_torch's timer)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_vs_torch import _median_time

    return _median_time(fn, 1, iters) * 1e3


def jax_layers(iters: int) -> list[dict]:
    """Forward, input-gradient, weight-gradient and the two rewrites' times of every layer, in XLA."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out = []
    for h, c, co in LAYERS:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((BATCH, h, h, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, c, co)) * 0.1, jnp.float32)
        g = jnp.asarray(rng.standard_normal((BATCH, h, h, co)), jnp.float32)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
        dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])

        @jax.jit
        def dw_patches(x, g):
            p = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.einsum("nhwk,nhwo->ko", p, g).reshape(c, 3, 3, co).transpose(1, 2, 0, 3)

        @jax.jit
        def dw_shifted(x, g):
            xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            g2 = g.reshape(-1, co)
            return jnp.stack([jnp.stack([xp[:, i:i + h, j:j + h, :].reshape(-1, c).T @ g2 for j in range(3)])
                              for i in range(3)])

        ref = dw(x, w, g)
        err = max(float(jnp.max(jnp.abs(f(x, g) - ref))) for f in (dw_patches, dw_shifted))
        r = {"layer": f"{h}x{h}x{c}->{co}",
             "fwd": _median_ms(lambda: fwd(x, w).block_until_ready(), iters),
             "dx": _median_ms(lambda: dx(x, w, g).block_until_ready(), iters),
             "dw": _median_ms(lambda: dw(x, w, g).block_until_ready(), iters),
             "dw_patches": _median_ms(lambda: dw_patches(x, g).block_until_ready(), iters),
             "dw_shifted": _median_ms(lambda: dw_shifted(x, g).block_until_ready(), iters),
             "max_abs_diff": err}
        out.append(r)
    return out


def torch_layers(iters: int) -> list[dict]:
    """The same layers' forward, input gradient and weight gradient in PyTorch (each gradient alone)."""
    import torch
    import torch.nn.functional as F

    out = []
    for h, c, co in LAYERS:
        x = torch.randn(BATCH, c, h, h)
        w = torch.randn(co, c, 3, 3) * 0.1
        g = torch.randn(BATCH, co, h, h)
        grad_input = torch.nn.grad.conv2d_input
        grad_weight = torch.nn.grad.conv2d_weight
        with torch.no_grad():
            out.append({"layer": f"{h}x{h}x{c}->{co}",
                        "fwd": _median_ms(lambda: F.conv2d(x, w, padding=1), iters),
                        "dx": _median_ms(lambda: grad_input(x.shape, w, g, padding=1), iters),
                        "dw": _median_ms(lambda: grad_weight(x, w.shape, g, padding=1), iters),
                        "threads": torch.get_num_threads()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--torch-python", default="", help="a Python with torch: its layers beside XLA's")
    p.add_argument("--only", choices=("jax", "torch"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.only:
        print(json.dumps(jax_layers(a.iters) if a.only == "jax" else torch_layers(a.iters)))
        return 0
    jx = jax_layers(a.iters)
    th = None
    if a.torch_python:
        res = subprocess.run([a.torch_python, os.path.abspath(__file__), "--only", "torch", "--iters", str(a.iters)],
                             capture_output=True, text=True)
        th = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
        if th is None:
            print(f"torch failed: {res.stderr[-500:]}", file=sys.stderr)
    print(f"3x3 convolutions of the reduced ResNet-18, batch {BATCH}, median of {a.iters}; ms (x the layer's forward)")
    head = f"{'layer':>16} {'fwd':>7} {'dx':>14} {'dw':>14} {'dw patches':>14} {'dw shifted':>14}"
    print(head + (f" | {'torch fwd':>9} {'torch dx':>9} {'torch dw':>9} {'XLA dw / torch dw':>18}" if th else ""))
    for i, r in enumerate(jx):
        f = r["fwd"]
        line = (f"{r['layer']:>16} {f:7.2f} " + " ".join(f"{r[k]:7.2f} ({r[k] / f:4.1f})"
                                                       for k in ("dx", "dw", "dw_patches", "dw_shifted")))
        if th:
            t = th[i]
            line += f" | {t['fwd']:9.2f} {t['dx']:9.2f} {t['dw']:9.2f} {r['dw'] / t['dw']:18.2f}"
        print(line)
    print(f"rewrites agree with XLA's weight gradient within {max(r['max_abs_diff'] for r in jx):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
