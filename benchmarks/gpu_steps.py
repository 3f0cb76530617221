"""Train steps on an accelerator: the backbones beside PyTorch, and every method beside its plain step
(issue 17, item 7).

Each figure is timed in a process of its own (one per backbone and side, one per method), on whatever
device JAX and PyTorch see first (a GPU when there is one). ``--workers N`` runs N such processes at
once: they compile side by side (XLA's compilation is CPU work, and a machine lent with one GPU has many
cores). A lock file keeps the timing clean: a process holds it shared while it compiles and warms up
(XLA's autotuning runs kernels on the device) and exclusively while it times, so no figure is timed
while another process uses the device (``$CLAX_BENCH_LOCK`` names the lock file where other timing
processes, e.g. ``trainer_overhead.py``, share it). Each JAX process takes ``0.85 / N`` of the device's
memory unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise.

1. **Backbones against PyTorch**, the same network, batch and Adam step in both:
   the reduced ResNet-18 (nf=20, 32x32x3, batch 64) and ViT-B/16 (224x224x3, batch 32, timm's
   ``vit_base_patch16_224`` on the PyTorch side), each a full fine-tuning step. For clax, the trainer's
   compiled step (``finetune``, TIL) and a plain Flax + optax step of the same network are both timed.
2. **Every method against its plain step** on the same backbone: the trainer's compiled step of each
   method at task 2 (``t = 1``, after ``begin_task``) over the median ``finetune`` step. ResNet-18 for
   the CNN methods (``clr`` reprograms it frozen), ViT-B/16 for ``soft_tf``.

Both sides use float32 with TF32 allowed in matrix products and convolutions (JAX's default on GPUs;
PyTorch is told ``allow_tf32``). The data are random arrays: only the shapes matter for the time. Each
figure is the lowest of ``--blocks`` medians of ``--iters`` steps, after warm-up.

    python benchmarks/gpu_steps.py --workers 4 --json gpu_steps.json   # everything: a table, and JSON
    python benchmarks/gpu_steps.py --quick --no-torch                   # tiny shapes: a CPU smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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
LOCK_ENV = "CLAX_BENCH_LOCK"


_LOCK_FILES: dict = {}


def _lock(kind: str):
    """This process's open lock file ``$CLAX_BENCH_LOCK`` (``kind="main"``) or its gate (``"gate"``, the
    same name with ``.gate``), or None where no lock is named."""
    path = os.environ.get(LOCK_ENV)
    if not path:
        return None
    if kind not in _LOCK_FILES:
        _LOCK_FILES[kind] = open(path + (".gate" if kind == "gate" else ""), "a")
    return _LOCK_FILES[kind]


def share_device() -> None:
    """Takes the lock shared for the rest of this process: it compiles and warms up on the device, so no
    other process times meanwhile (a process exiting drops it). It passes the gate first, so a process
    waiting to time is not kept waiting by processes that start after it."""
    main, gate = _lock("main"), _lock("gate")
    if main is not None:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(main, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)


@contextlib.contextmanager
def device_lock():
    """Holds the lock exclusively: no other timing process compiles, warms up or times on the device
    meanwhile. Afterwards this process holds it shared again (nothing when ``$CLAX_BENCH_LOCK`` is unset).

    A writer-first lock from two ``flock`` files: the waiting process drops its shared hold, takes the
    gate (so no new process can take the lock shared) and waits on the lock until the processes still
    compiling have dropped theirs."""
    main, gate = _lock("main"), _lock("gate")
    if main is None:
        yield
        return
    fcntl.flock(main, fcntl.LOCK_UN)
    fcntl.flock(gate, fcntl.LOCK_EX)
    fcntl.flock(main, fcntl.LOCK_EX)
    fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(main, fcntl.LOCK_SH)


def _blocks(fn, blocks: int, iters: int) -> float:
    """The lowest of ``blocks`` medians of ``iters`` calls of ``fn`` (warmed up already), under the lock."""
    with device_lock():
        return min(_median(fn, 0, iters) for _ in range(max(1, blocks)))


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


def method_setup(method: str, backbone: dict, size: int):
    """``(method, bench, train config)``: ``method`` with its default settings on ``backbone`` (TIL) and
    the 2-task stream of ``size x size`` images it is timed on."""
    from clax.config import default_config, train_config
    from clax.methods import get_method
    from clax.models import get_backbone
    from clax.train import make_context

    cfg = default_config(method)
    bench = _bench(size)
    bb = dict(backbone)
    ctx = make_context(get_backbone(bb.pop("name"), bench.input_shape, **bb), bench, "til")
    meth = get_method(method, ctx, **cfg[method]) if method in cfg else get_method(method, ctx)
    return meth, bench, train_config(cfg)


def method_step(method: str, backbone: dict, size: int, batch: int, iters: int, blocks: int = 1) -> float:
    """Median seconds of the trainer's compiled step of ``method`` at task 2 (TIL) on ``backbone``."""
    from _timing import train_step_seconds

    meth, bench, tc = method_setup(method, backbone, size)
    return train_step_seconds(meth, bench, t=1, iters=iters, batch_size=batch, warmup=3, begin_task=True, cfg=tc,
                              blocks=blocks, hold=device_lock)


def plain_program(backbone: dict, size: int, batch: int):
    """``(step, args)``: a plain Flax + optax Adam step of the same network and one linear head, jitted,
    and its first arguments; ``step(*args)`` returns the next arguments and the loss."""
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
        return (optax.apply_updates(p, u), o, s2), l

    return step, (p, opt.init(p), stats)


def plain_step(backbone: dict, size: int, batch: int, iters: int, blocks: int = 1) -> float:
    """Median seconds of :func:`plain_program`'s step."""
    import jax

    step, args = plain_program(backbone, size, batch)
    st = {"a": args}

    def one():
        st["a"], l = step(*st["a"])
        jax.block_until_ready(l)

    for _ in range(3):
        one()
    return _blocks(one, blocks, iters)


def torch_step(name: str, quick: bool, iters: int, blocks: int = 1) -> dict:
    """Median seconds of PyTorch's eager Adam step of backbone ``name`` (the same network and batch)."""
    import torch
    import torch.nn.functional as F

    from step_vs_torch import torch_resnet18

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    bb, size, batch = (QUICK if quick else SHAPES)[name]
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

    for _ in range(5):
        one()
    return {"step_s": _blocks(one, blocks, iters), "params": sum(p.numel() for p in net.parameters()),
            "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
            "batch": batch, "size": size}


def item_specs(quick: bool, methods: bool, torch: bool) -> list[str]:
    """The figures to time, ``KIND/BACKBONE[/METHOD]``, the slowest to compile (ViT-B/16's) first."""
    specs = []
    for name in sorted(QUICK if quick else SHAPES, key=lambda n: n != "vit_b16"):
        meths = (CNN_METHODS if name == "resnet18" else VIT_METHODS) if methods else ("finetune",)
        specs += [f"method/{name}/{m}" for m in meths] + [f"plain/{name}"] + ([f"torch/{name}"] if torch else [])
    return specs


def run_item(spec: str, quick: bool, iters: int, blocks: int) -> dict:
    """Times one figure in this process (see :func:`item_specs`)."""
    share_device()
    kind, name, *rest = spec.split("/")
    if kind == "torch":
        return torch_step(name, quick, iters, blocks)
    import jax

    bb, size, batch = (QUICK if quick else SHAPES)[name]
    s = plain_step(bb, size, batch, iters, blocks) if kind == "plain" else method_step(rest[0], bb, size, batch,
                                                                                        iters, blocks)
    return {"step_s": s, "batch": batch, "size": size, "device": str(jax.devices()[0].device_kind),
            "platform": jax.devices()[0].platform, "jax": jax.__version__}


def table(items: dict, iters: int, blocks: int) -> str:
    """The two Markdown tables of the figures in ``items`` (spec -> result)."""
    def ms(spec):
        r = items.get(spec, {})
        return r["step_s"] * 1e3 if "step_s" in r else None

    def cell(v, spec=""):
        return f"{v:.2f}" if v is not None else ("failed" if spec in items else "not run")

    jx = next((r for k, r in items.items() if "jax" in r), None)
    th = next((r for k, r in items.items() if "torch" in r), None)
    lines = [f"device: JAX {jx['jax']} on {jx['device']} ({jx['platform']})" if jx
             else "device: every JAX figure failed",
             f"PyTorch {th['torch']} on {th['device']}" if th else "PyTorch: no figure",
             f"lowest of {blocks} medians of {iters} steps after warm-up, float32 (TF32 allowed), Adam", "",
             "| backbone | batch | clax step ms | plain Flax ms | PyTorch ms | clax/PyTorch | plain/PyTorch |",
             "|---|---|---|---|---|---|---|"]
    names = sorted({k.split("/")[1] for k in items})
    for name in names:
        c, p, t = ms(f"method/{name}/finetune"), ms(f"plain/{name}"), ms(f"torch/{name}")
        batch = next((r["batch"] for k, r in items.items() if k.split("/")[1] == name and "batch" in r), "?")
        ratio = (lambda a: f"{a / t:.2f}x" if a is not None and t else "")
        lines.append(f"| {name} | {batch} | {cell(c, f'method/{name}/finetune')} | {cell(p, f'plain/{name}')} | "
                     f"{cell(t, f'torch/{name}')} | {ratio(c)} | {ratio(p)} |")
    meth = [k for k in items if k.startswith("method/")]
    if len(meth) > len(names):
        lines += ["", "| backbone / method | step ms | / finetune step |", "|---|---|---|"]
        for name in names:
            base = ms(f"method/{name}/finetune")
            order = CNN_METHODS + VIT_METHODS
            for k in sorted((k for k in meth if k.split("/")[1] == name), key=lambda k: order.index(k.split("/")[2])):
                v = ms(k)
                err = items[k].get("error", "")[-200:].replace("\n", " ").replace("|", "/")
                lines.append(f"| {name} / {k.split('/')[2]} | {cell(v) if v is not None else 'failed: ' + err} | "
                             f"{f'{v / base:.2f}x' if v is not None and base else ''} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--item", help="time one figure in this process and print it as JSON (used by the full run)")
    ap.add_argument("--workers", type=int, default=1, help="figures timed in that many processes at once")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=3, help="each figure is the lowest of this many medians")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the script, not a figure")
    ap.add_argument("--no-methods", action="store_true", help="only the backbones")
    ap.add_argument("--no-torch", action="store_true", help="no PyTorch figures")
    ap.add_argument("--item-timeout", type=float, default=600, help="seconds a figure's process may take")
    ap.add_argument("--json", help="write every figure to this file (rewritten as each one arrives)")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error(f"--workers must be at least 1, got {a.workers}")
    if a.item:
        print(json.dumps(run_item(a.item, a.quick, a.iters, a.blocks)))
        return
    specs = item_specs(a.quick, not a.no_methods, not a.no_torch)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{min(0.75, 0.85 / a.workers):.2f}")
    flags = ["--iters", str(a.iters), "--blocks", str(a.blocks)] + (["--quick"] if a.quick else [])
    items, t_start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clax-bench-") as tmp:
        env.setdefault(LOCK_ENV, os.path.join(tmp, "lock"))  # a lock already named is shared with others

        def one(spec):
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--item", spec] + flags,
                                   capture_output=True, text=True, env=env, timeout=a.item_timeout)
                out = p.stdout.strip().splitlines()
                res = json.loads(out[-1]) if p.returncode == 0 and out else {"error": p.stderr[-2000:]}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {a.item_timeout:.0f} s"}
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            items[spec] = res
            done = f"{res['step_s'] * 1e3:.2f} ms" if "step_s" in res else "FAILED " + res["error"][-300:]
            print(f"[{time.perf_counter() - t_start:6.0f} s] {spec}: {done} ({res['wall_s']} s)", file=sys.stderr,
                  flush=True)
            if a.json:
                tmp = a.json + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"iters": a.iters, "blocks": a.blocks, "items": items}, f, indent=1)
                os.replace(tmp, a.json)

        with ThreadPoolExecutor(a.workers) as ex:
            list(ex.map(one, specs))
    print(table(items, a.iters, a.blocks))
    if not any("step_s" in r for k, r in items.items() if not k.startswith("torch/")):
        sys.exit("every JAX figure failed (the errors are above)")


if __name__ == "__main__":
    main()
