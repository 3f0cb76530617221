"""Split-CIFAR-10 on real images (class-folder JPEGs): finetune and replay (buffer 500), TIL and CIL,
reduced ResNet-18 (nf=20), Adam 1e-3, batch 32; prints one JSON line per run (ACC, BWT, seconds, matrix).

    tar -xzf ../shared/data/cifar10-images.tar.gz -C /tmp/cifar10
    python benchmarks/split_cifar10_real.py TRAIN_PER_CLASS EPOCHS TEST_PER_CLASS [DATA_DIR]
"""
import json, sys, time
import numpy as np
from clax.data.folder import split_cifar10_folder
from clax.models import get_backbone
from clax.methods import get_method
from clax.train import TrainConfig, fit, make_context
per_class, epochs, test_per_class = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = []
bench = split_cifar10_folder(seed=0, view="image", data_dir=sys.argv[4] if len(sys.argv) > 4 else "/tmp/cifar10", train_per_class=per_class, test_per_class=test_per_class)
for method in ["finetune", "replay"]:
    for scen in ["til", "cil"]:
        t0 = time.perf_counter()
        ctx = make_context(get_backbone("resnet18", bench.input_shape, nf=20), bench, scen)
        kw = {"buffer_size": 500} if method == "replay" else {}
        m = get_method(method, ctx, **kw)
        out = fit(m, ctx, bench, TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, seed=0), progress=False)
        row = dict(method=method, scenario=scen, acc=out["acc"], bwt=out["bwt"], seconds=time.perf_counter() - t0,
                   train_s=out["timing"]["train_s"], A=np.round(out["accuracy_matrix"], 3).tolist())
        print(json.dumps(row), flush=True)
