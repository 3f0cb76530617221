"""Split-CIFAR-10 on real images (class-folder JPEGs): finetune and replay, TIL and CIL, with the reduced
ResNet-18 (nf=20), Adam 1e-3, batch 32, seed 0. Prints one JSON line per run (ACC, BWT, forgetting,
seconds, accuracy matrix) and, with ``--out``, writes them to a JSON-lines file.

    mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10-images.tar.gz -C /tmp/cifar10
    python benchmarks/split_cifar10_real.py --train-per-class 500 --epochs 3 --test-per-class 200

The images stream from disk through :class:`clax.data.pipeline.ImageSource` (decoding, CIFAR-style
random crop and flip, prefetch), as ``clax run --benchmark split-cifar10 --data-dir DIR`` does.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from clax.data.folder import split_cifar10_folder
from clax.methods import get_method
from clax.models import get_backbone
from clax.train import TrainConfig, fit, make_context


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data", default="/tmp/cifar10", help="folder with train/<class>/*.jpg and test/<class>/*.jpg")
    p.add_argument("--train-per-class", type=int, default=500, help="training images per class (5,000 = all)")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class (1,000 = all)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--nf", type=int, default=20, help="ResNet-18 width")
    p.add_argument("--buffer", type=int, default=500, help="replay buffer size")
    p.add_argument("--methods", default="finetune,replay")
    p.add_argument("--scenarios", default="til,cil")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    bench = split_cifar10_folder(seed=0, view="image", data_dir=args.data, train_per_class=args.train_per_class,
                                 test_per_class=args.test_per_class)
    rows = []
    for method in args.methods.split(","):
        for scen in args.scenarios.split(","):
            t0 = time.perf_counter()
            ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=args.nf), bench, scen)
            m = get_method(method, ctx, **({"buffer_size": args.buffer} if method == "replay" else {}))
            out = fit(m, ctx, bench, TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3, seed=0),
                      progress=not args.quiet)
            row = dict(method=method, scenario=scen, train_per_class=args.train_per_class, epochs=args.epochs,
                       acc=out["acc"], bwt=out["bwt"], forgetting=out["forgetting"],
                       seconds=round(time.perf_counter() - t0, 1), train_s=round(out["timing"]["train_s"], 1),
                       A=np.round(out["accuracy_matrix"], 3).tolist())
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
