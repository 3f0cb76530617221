"""Input-pipeline throughput (CIFAR-style augmentation) beside the reduced ResNet-18 train step's consumption.

Measures, on CIFAR-10 JPEGs in the class-folder layout (../shared/data/cifar10-images.tar.gz where
present, else 2,000 synthetic 32x32 JPEGs written to a temporary folder):

1. pipeline: images/s of ``train_batches`` over a lazy :class:`clax.data.pipeline.ImageSource`
   (JPEG decode, random crop with 4-pixel padding, horizontal flip, normalisation), no training;
2. step: images/s that the compiled finetune train step of reduced ResNet-18 (nf=20, Adam) consumes
   on batches already in memory;
3. end-to-end: images/s of the train step fed by the pipeline through ``prefetch`` (what the trainer does).

Prints the three and the ratio pipeline / step (> 1: the accelerator does not wait for data).

    python benchmarks/pipeline_throughput.py [--batch 64] [--steps 30] [--data DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time


def data_dir(arg: str | None) -> tuple[str, str]:
    """A CIFAR-10-style folder and a description of where it came from."""
    if arg:
        return arg, arg
    here = os.path.dirname(os.path.abspath(__file__))
    tar = os.path.normpath(os.path.join(here, "..", "..", "shared", "data", "cifar10-images.tar.gz"))
    out = tempfile.mkdtemp(prefix="clax-cifar10-")
    if os.path.isfile(tar):
        subprocess.run(["tar", "-xzf", tar, "-C", out], check=True)
        return out, "CIFAR-10 JPEGs from ../shared/data"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 20)):
        for c in range(10):
            d = os.path.join(out, split, f"class{c}")
            os.makedirs(d)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.jpg"))
    return out, "2,000 synthetic 32x32 JPEGs"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--data")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from clax.data.folder import split_cifar10_folder
    from clax.data.pipeline import prefetch
    from clax.data.stream import train_batches
    from clax.methods import get_method
    from clax.models import get_backbone
    from clax.train import Steps, TrainConfig, TrainState, make_context, make_optimizer, trainable

    root, where = data_dir(args.data)
    bench = split_cifar10_folder(seed=0, view="image", data_dir=root)
    task = bench.tasks[0]
    x, y = task.x_train, task.targets(task.y_train, "cil")
    tid = np.zeros(len(y), np.int32)
    n_img = args.steps * args.batch

    def batches(seed):
        rng = np.random.default_rng(seed)
        while True:
            yield from train_batches(x, y, args.batch, rng, tid)

    # 1. pipeline alone
    it = batches(0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    pipe = n_img / (time.perf_counter() - t0)

    # 2. the compiled step on in-memory batches
    ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=20), bench, "cil")
    method = get_method("finetune", ctx)
    cfg = TrainConfig(batch_size=args.batch)
    tx = make_optimizer(cfg)
    steps = Steps(method, tx, "cil")
    cl = method.init(jax.random.PRNGKey(0))
    ts = TrainState(cl, tx.init(trainable(cl, 0)), jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
    fixed = [next(batches(1)) for _ in range(4)]
    t = jnp.int32(0)
    for b in fixed[:2]:  # compile and warm up
        ts, m = steps.train_step(ts, b, t)
    jax.block_until_ready(ts)
    t0 = time.perf_counter()
    for i in range(args.steps):
        ts, m = steps.train_step(ts, fixed[i % 4], t)
    jax.block_until_ready(ts)
    step = n_img / (time.perf_counter() - t0)

    # 3. end to end, as the trainer runs it (prefetch thread decoding while the step runs)
    it = prefetch(batches(2), size=2)
    ts, m = steps.train_step(ts, next(it), t)
    jax.block_until_ready(ts)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        ts, m = steps.train_step(ts, next(it), t)
    jax.block_until_ready(ts)
    e2e = n_img / (time.perf_counter() - t0)
    it.close()

    print(f"data: {where}; batch {args.batch}, {args.steps} steps; {jax.device_count()} {jax.default_backend()} "
          f"device(s), {os.cpu_count()} CPU cores")
    print(f"pipeline (decode + crop + flip + normalise): {pipe:9.0f} images/s")
    print(f"train step, reduced ResNet-18 (nf=20):       {step:9.0f} images/s")
    print(f"train step fed by the pipeline (prefetch):   {e2e:9.0f} images/s")
    print(f"ratio pipeline / step: {pipe / step:.2f}   end-to-end / step: {e2e / step:.2f}")


if __name__ == "__main__":
    main()
