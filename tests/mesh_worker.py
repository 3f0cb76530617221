"""Run by tests/test_mesh.py in a process with 8 forced CPU devices (XLA_FLAGS set by the test):
trains each method named on the command line on tiny split-digits with a 1-device mesh and with the
default mesh (all 8 devices as the data axis), and with data=4 x model=2 where asked, and prints one
JSON line with the accuracy matrices, the largest parameter difference and the bytes per device."""
import json
import sys

import jax
import numpy as np

from battery import tiny_digits
from clax import mesh as M
from clax.methods import get_method
from clax.models import get_backbone
from clax.train import TrainConfig, fit, make_context

SETTINGS = {"clr": {"pretrained": "none"}, "soft_tf": {"pretrained": "none", "masked_blocks": 1},
            "hnet": {"chunk_size": 256, "task_emb_dim": 8, "chunk_emb_dim": 8, "hidden": [16, 16]}}
BACKBONES = {"clr": ("resnet18", {"nf": 4}), "soft_tf": ("vit", {"depth": 1, "dim": 32, "heads": 2})}


def run(name, mesh, shard_min_size=1 << 20, shard=""):
    bench = tiny_digits(num_tasks=2, n_train=64, n_test=64)
    bb, kw = BACKBONES.get(name, ("mlp", {"hidden": [32]}))
    from clax.data import split_digits  # image view for the CNN / ViT backbones
    if bb != "mlp":
        full = split_digits(seed=0, view="image")
        from clax.data import Benchmark
        from clax.data.stream import Task
        tasks = tuple(Task(t.task_id, t.classes, t.x_train[:64], t.y_train[:64], t.x_test[:64], t.y_test[:64])
                      for t in full.tasks[:2])
        bench = Benchmark(full.name, tasks, full.num_classes, full.input_shape, full.class_names)
    scenario = "cil" if name in ("replay+lwf",) else "til"
    ctx = make_context(get_backbone(bb, bench.input_shape, **kw), bench, scenario)
    m = get_method(name, ctx, **SETTINGS.get(name, {}))
    out = fit(m, ctx, bench, TrainConfig(epochs=1, batch_size=16, eval_batch_size=64), progress=False, mesh=mesh,
              shard_min_size=shard_min_size, shard=shard)
    return out


def main():
    assert jax.device_count() == 8, jax.device_count()
    res = {}
    for spec in sys.argv[1:]:
        name, _, layout = spec.partition(":")
        one = run(name, M.make_mesh(1, 1))
        meshes = {"data8": (M.make_mesh(), 1 << 20, "")}
        if layout == "model2":  # large leaves split over model; then the leaves a path rule names
            meshes["data4model2"] = (M.make_mesh(4, 2), 1000, "")
            meshes["data4model2path"] = (M.make_mesh(4, 2), 1 << 30, "cl/shared/backbone")
        entry = {"one": np.nan_to_num(one["accuracy_matrix"], nan=-1).tolist(), "bwt_one": one["bwt"],
                 "bytes_one": one["devices"]["bytes_per_device"]}
        for key, (mesh, msz, shard) in meshes.items():
            out = run(name, mesh, msz, shard)
            diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                       for a, b in zip(jax.tree.leaves((one["state"].cl.shared, one["state"].cl.per_task)),
                                       jax.tree.leaves((out["state"].cl.shared, out["state"].cl.per_task))))
            entry[key] = {"A": np.nan_to_num(out["accuracy_matrix"], nan=-1).tolist(), "bwt": out["bwt"],
                          "param_diff": diff, "devices": out["devices"]}
        res[spec] = entry
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
