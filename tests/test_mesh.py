"""clax.mesh: data parallelism over 8 forced CPU devices, the model axis, checkpoints moving between
device counts, and bad meshes refused before any data loads.

The 8-device runs happen in subprocesses (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be
set before JAX starts). Tolerance observed (tests/mesh_worker.py, tiny split-digits, 1 epoch): the
accuracy matrices are equal; parameters differ by at most 1.5e-5 (finetune, replay, wsn, hnet, pah) and
1.1e-3 (clr: Adam turns last-bit differences of near-zero gradients, summed in another order over 8
devices, into steps of up to the learning rate); the asserts allow one test sample and 1e-2.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from clax.config import ConfigError, default_config, validate

HERE = os.path.dirname(os.path.abspath(__file__))
_PATH = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH", "")) if p)
# the subprocesses share the session's persistent compilation cache (tests/conftest.py)
CACHE = {"PYTHONPATH": _PATH, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
EIGHT = {**os.environ, **CACHE, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
ONE = {**os.environ, **CACHE, "XLA_FLAGS": ""}


def _clax(args, env, check=True):
    p = subprocess.run([sys.executable, "-m", "clax.cli", *args], env=env, capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_eight_devices_give_the_one_device_run():
    p = subprocess.run([sys.executable, os.path.join(HERE, "mesh_worker.py"), "finetune:model2", "replay", "wsn",
                        "hnet", "pah", "clr"], env=EIGHT, capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    for name, entry in res.items():
        for layout in ("data8", "data4model2", "data4model2path"):
            if layout not in entry:
                continue
            got = entry[layout]
            assert got["devices"]["devices"] == 8 and got["devices"]["processes"] == 1
            np.testing.assert_allclose(got["A"], entry["one"], atol=1 / 64 + 1e-9, err_msg=f"{name} {layout}")
            assert got["param_diff"] < 1e-2, (name, layout, got["param_diff"])
            if name in ("wsn", "clr"):  # parameter isolation: exactly no forgetting on 8 devices too
                assert got["bwt"] == 0.0 and entry["bwt_one"] == 0.0
    split = res["finetune:model2"]["data4model2"]["devices"]
    assert split["mesh"] == {"data": 4, "model": 2}
    # every leaf of at least 1000 values split over the model axis: about half the bytes on each device
    assert split["bytes_per_device"] < 0.6 * res["finetune:model2"]["bytes_one"]
    # a path rule (mesh.shard) splits the leaves it names, here the backbone's, whatever their size
    by_path = res["finetune:model2"]["data4model2path"]["devices"]["bytes_per_device"]
    assert split["bytes_per_device"] <= by_path < res["finetune:model2"]["bytes_one"]


def _truncate_to_task(src, dst, task):
    """A copy of workdir ``src`` as a kill after task ``task`` leaves it."""
    from clax import checkpoint as ckpt

    shutil.copytree(src, dst)
    ends = ckpt.task_checkpoints(str(src))
    for t, step in ends.items():
        if t > task:
            shutil.rmtree(os.path.join(dst, "checkpoints", str(step)))
    for f in ("results.json", "metrics.csv"):
        os.remove(os.path.join(dst, f))


@pytest.mark.parametrize("first, then", [(EIGHT, ONE), (ONE, EIGHT)], ids=["8-then-1", "1-then-8"])
def test_a_checkpoint_resumes_on_another_device_count(tmp_path, first, then):
    args = ["run", "--method", "replay", "--epochs", "1", "--quiet", "--set", "backbone.hidden=[32]"]
    full = tmp_path / "full"
    _clax(args + ["--workdir", str(full)], first)
    cut = tmp_path / "cut"
    _truncate_to_task(full, cut, 1)
    p = _clax(args + ["--workdir", str(cut)], then)
    assert "resuming" in p.stdout + p.stderr
    a = json.loads((full / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    assert a["devices"]["devices"] == (8 if first is EIGHT else 1)
    assert b["devices"]["devices"] == (8 if then is EIGHT else 1)
    np.testing.assert_allclose(np.array(b["accuracy_matrix"], float), np.array(a["accuracy_matrix"], float),
                               atol=2 / 70, equal_nan=True)
    assert b["timing"]["steps"] == a["timing"]["steps"]


def test_a_mesh_that_does_not_fit_is_refused_naming_the_numbers(tmp_path):
    cfg = default_config("finetune")
    cfg["mesh"]["data"] = 2  # this process has one device
    with pytest.raises(ConfigError, match=r"mesh.data=2 x mesh.model=1 = 2 devices does not divide the 1 devices"):
        validate(cfg)
    cfg["mesh"].update(data=0, model=3)
    with pytest.raises(ConfigError, match="mesh.model=3 does not divide the 1 devices"):
        validate(cfg)
    w = tmp_path / "w"
    p = _clax(["run", "--method", "finetune", "--set", "train.batch_size=30", "--workdir", str(w)], EIGHT, check=False)
    assert p.returncode == 2 and not w.exists()
    assert "train.batch_size=30 is not divisible by the mesh's data axis (8 devices)" in p.stderr
    p = _clax(["run", "--method", "finetune", "--set", "mesh.model=3", "--workdir", str(w)], EIGHT, check=False)
    assert p.returncode == 2 and "mesh.model=3 does not divide the 8 devices" in p.stderr and not w.exists()


@pytest.mark.skipif(jax.device_count() > 1, reason="needs a one-device process")
def test_put_batch_passes_host_arrays_through_on_a_one_device_mesh():
    """No device_put per batch on one device: the compiled step's call copies the host arrays itself
    (the 8-device runs above go through the split)."""
    from clax import mesh as M

    batch = {"x": np.ones((8, 3), np.float32), "y": np.arange(8, dtype=np.int32)}
    assert M.put_batch(batch, M.make_mesh()) is batch
