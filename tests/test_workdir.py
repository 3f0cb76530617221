"""Workdir integrity (issue 12): atomic writes, the pretraining cache of a run killed while writing it,
one run per workdir, a moved workdir that resumes."""
import contextlib
import hashlib
import io
import json
import os
import types
import signal
import subprocess
import sys

import pytest

from clax import pretrain
from clax import workdir as wd
from clax.cli import main

TINY = ["run", "--method", "finetune", "--epochs", "1", "--quiet", "--set", "backbone.hidden=[16]"]
# clr at its smallest: a 2-filter ResNet-18, one pretraining step, one epoch
CLR = ["run", "--method", "clr", "--epochs", "1", "--quiet", "--set", "backbone.nf=2", "--set",
       "clr.pretrain_steps=1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A clr run that is killed (SIGKILL) while it writes its pretraining cache: when the weights' temporary
# file is about to be renamed into place, it is cut to half its length and the process kills itself.
# (Its pretraining is replaced by zeros, to get there without compiling anything.)
KILL_WHILE_WRITING_CACHE = """
import os, signal, sys
import jax
import numpy as np
from clax import pretrain
real_replace = os.replace
def replace(src, dst):
    if dst.endswith(".msgpack"):
        with open(src, "r+b") as f:
            f.truncate(os.path.getsize(src) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
def no_pretraining(backbone, steps, seed, **kw):
    shapes = jax.eval_shape(backbone.init, jax.random.PRNGKey(seed))
    return (*jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), {"steps": steps})
pretrain.pretrain = no_pretraining
from clax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _temps(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------------
# atomic writes


def test_a_failure_in_the_middle_of_a_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    wd.atomic_write(str(path), '{"old": 1}')
    with pytest.raises(OSError, match="disk full"):
        with wd.atomic_open(str(path), "w") as f:
            f.write('{"new": ')
            f.flush()
            raise OSError("disk full")
    assert path.read_text() == '{"old": 1}' and _temps(tmp_path) == []
    wd.atomic_write(str(path), b'{"new": 2}')
    assert path.read_text() == '{"new": 2}' and _temps(tmp_path) == []


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A temporary file of a dead process is removed; a live process's write in flight is left."""
    path = str(tmp_path / "metrics.csv")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = wd.temp_name(path).replace(f"-{os.getpid()}-", f"-{pid}-")
    live = wd.temp_name(path).replace(f"-{os.getpid()}-", f"-{os.getppid()}-")
    for p in (stale, live):
        with open(p, "w") as f:
            f.write("task,ep")
    wd.atomic_write(path, "task,epoch\n")
    assert not os.path.exists(stale) and os.path.exists(live)


def test_results_json_stays_whole_when_the_write_fails(tmp_path, monkeypatch, capsys):
    """The runner writes results.json atomically: a failure mid-write (a full disk) leaves the previous
    file, no temporary file, and the lock released."""
    w = tmp_path / "w"
    assert main(TINY + ["--workdir", str(w)]) == 0
    before = {n: (w / n).read_bytes() for n in ("results.json", "metrics.csv", "accuracy_matrix.png")}

    def full_disk(obj, f, **kw):
        f.write(json.dumps(obj)[:50])
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("clax.runner.json", types.SimpleNamespace(dump=full_disk))
    capsys.readouterr()
    try:
        main(TINY + ["--workdir", str(w)])  # the clax command reports it (exit 2) or it propagates
    except OSError as e:
        assert "No space left" in str(e)
    else:
        assert "No space left" in capsys.readouterr().err
    assert {n: (w / n).read_bytes() for n in before} == before
    assert _temps(w) == [] and not (w / wd.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------
# one run per workdir


def _hold_lock(w):
    """A second process that takes ``w``'s run lock (as ``clax run`` does) and waits."""
    p = subprocess.Popen([sys.executable, "-c", "import sys, time, clax.workdir as w\n"
                          "l = w.lock(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(w)],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_creates_and_cleans_up_its_workdir_and_fresh_keeps_lock_and_cache(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("mine")
    with pytest.raises(ValueError, match="a file"):
        wd.lock(str(f / "w"))
    with wd.lock(str(tmp_path / "new" / "w")):  # refused before writing anything: nothing is left
        assert (tmp_path / "new" / "w" / wd.LOCK_NAME).is_file()
    assert sorted(os.listdir(tmp_path)) == ["a-file"]
    w = tmp_path / "w"
    (w / "pretrain").mkdir(parents=True)
    (w / "pretrain" / "k.msgpack").write_bytes(b"weights")
    (w / "results.json").write_text("{}")
    with wd.lock(str(w)):
        old = wd.move_aside(str(w))
        assert sorted(os.listdir(w)) == sorted([wd.LOCK_NAME, "pretrain"])  # the held lock stays
    assert old == f"{w}.old-1" and sorted(os.listdir(old)) == ["pretrain", "results.json"]
    assert os.path.samefile(w / "pretrain" / "k.msgpack", os.path.join(old, "pretrain", "k.msgpack"))


def test_a_parent_made_meanwhile_by_another_process_is_no_error(tmp_path, monkeypatch):
    """The main job's workers create their workdirs under one parent at the same moment: the one whose
    mkdir of the parent loses the race goes on (seen: 'cannot create workdir .../soft_tf-til: File
    exists'), and leaves the parent alone when it cleans up, since it did not make it."""
    parent, real = tmp_path / "main", os.mkdir

    def racing_mkdir(path, *a, **k):
        if os.fspath(path) == str(parent):
            real(path)  # another worker makes it first
            raise FileExistsError(17, "File exists", os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    assert wd._makedirs(str(parent / "soft_tf-til")) == [str(parent / "soft_tf-til")]
    assert (parent / "soft_tf-til").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="a file"):  # a file in the way is still refused
        wd._makedirs(str(tmp_path / "f" / "w"))


def test_a_second_run_on_a_locked_workdir_exits_2_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    w = tmp_path / "w"
    w.mkdir()
    (w / "results.json").write_text("a previous run")
    holder = _hold_lock(w)
    try:
        capsys.readouterr()
        assert main(TINY + ["--workdir", str(w)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(w) in err and f"pid {holder.pid}" in err, err
        # --fresh takes the lock before moving anything aside
        assert main(TINY + ["--workdir", str(w), "--fresh"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err, err
        assert sorted(os.listdir(w)) == sorted(["results.json", wd.LOCK_NAME])
        assert (w / "results.json").read_text() == "a previous run" and not os.path.exists(f"{w}.old-1")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the dead holder's lock file is still there, naming it: it does not block, nor does a live pid in it
    assert f"pid {holder.pid}" in (w / wd.LOCK_NAME).read_text()
    (w / wd.LOCK_NAME).write_text(f"pid {os.getppid()} host {os.uname().nodename} started 2000-01-01\n")
    assert main(TINY + ["--workdir", str(w), "--fresh"]) == 0
    assert json.loads((w / "results.json").read_text())["method"] == "finetune"
    assert (tmp_path / "w.old-1" / "results.json").read_text() == "a previous run"
    assert not (w / wd.LOCK_NAME).exists()  # released at the end


# ---------------------------------------------------------------------------------------------------
# the pretraining cache of a run killed while writing it; the moved workdir


@pytest.fixture(scope="module")
def clr_killed_then_rerun(tmp_path_factory):
    """A clr run killed while it writes its pretraining cache, then the same command again:
    ``(workdir, stderr of the rerun, the cache's path)``."""
    w = tmp_path_factory.mktemp("clr") / "run"
    argv = CLR + ["--workdir", str(w)]
    p = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING_CACHE, *argv], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    pre = w / "pretrain"
    temps = _temps(pre)
    assert len(temps) == 1 and ".msgpack." in temps[0], os.listdir(pre)  # a half-written temporary file
    assert not any(n.endswith((".msgpack", ".json")) for n in os.listdir(pre)), os.listdir(pre)
    # and a cut-off cache as clax wrote it in place before (0 bytes, no report) or a damaged disk leaves
    cache = pre / (temps[0][1:].split(".msgpack.")[0] + ".msgpack")
    cache.write_bytes(b"")
    saved = dict(pretrain._MEMO)
    pretrain._MEMO.clear()  # this process has not pretrained it: the disk decides
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        pretrain._MEMO.clear()
        pretrain._MEMO.update(saved)
    err = err.getvalue()
    assert rc == 0, err[-2000:]
    return w, err, cache


def test_clr_killed_while_writing_its_pretraining_cache_names_sets_aside_and_rebuilds_it(clr_killed_then_rerun):
    w, err, cache = clr_killed_then_rerun
    lines = [ln for ln in err.splitlines() if "damaged" in ln]
    assert len(lines) == 1 and str(cache) in lines[0] and "pretraining again" in lines[0], err[-2000:]
    aside = f"{cache}.damaged-1"
    assert os.path.getsize(aside) == 0  # set aside, not deleted
    assert _temps(cache.parent) == []  # the killed writer's temporary file is gone
    report = json.loads(cache.with_suffix(".json").read_text())
    assert report["weights_sha256"] == hashlib.sha256(cache.read_bytes()).hexdigest()
    res = json.loads((w / "results.json").read_text())
    assert res["pretrain"]["source"] == "glyphs" and len(res["accuracy_matrix"]) == res["num_tasks"]


def test_a_moved_workdir_spelled_differently_resumes_and_reuses_its_cache(clr_killed_then_rerun, tmp_path,
                                                                          monkeypatch, capsys):
    w, _, cache = clr_killed_then_rerun
    res = json.loads((w / "results.json").read_text())
    assert res["config"]["clr"]["pretrain_dir"] == ""  # stored relative to the workdir
    moved = tmp_path / "elsewhere" / "x"
    moved.parent.mkdir()
    os.rename(w, moved)
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(pretrain, "_MEMO", {})

        def no_pretraining(*a, **k):
            raise AssertionError("pretrained again instead of reading the moved workdir's cache")

        monkeypatch.setattr(pretrain, "pretrain", no_pretraining)
        capsys.readouterr()
        assert main(CLR + ["--workdir", "./elsewhere//x/"]) == 0, capsys.readouterr().err[-2000:]
        err = capsys.readouterr().err
        assert "resuming ./elsewhere//x/" in err and "different config" not in err, err[-2000:]
        again = json.loads((moved / "results.json").read_text())
        assert again["accuracy_matrix"] == res["accuracy_matrix"]
        assert again["pretrain"]["cached"] == str(moved / "pretrain" / cache.name)
    finally:
        os.rename(moved, w)


def test_a_fresh_workdir_copies_the_shared_pretraining_cache_instead_of_pretraining(clr_killed_then_rerun, tmp_path,
                                                                                 monkeypatch, capsys):
    """cache.pretrain (on by default): the pretrained backbone is kept in the user-level cache too
    ($CLAX_PRETRAIN_CACHE here), and a run in a fresh workdir reads it from there, keeps its own copy,
    and gives the same results; with cache.pretrain=false it pretrains again. The shared entry's name
    carries the CPU thread count (XLA's CPU results depend on it), the workdir's does not."""
    w, _, cache = clr_killed_then_rerun
    res = json.loads((w / "results.json").read_text())
    tag = pretrain.cpu_threads_tag()
    assert tag == f"-cpu{len(os.sched_getaffinity(0))}"  # the tests run on the CPU
    shared = os.path.join(os.environ["CLAX_PRETRAIN_CACHE"], cache.name[:-len(".msgpack")] + tag + ".msgpack")
    assert not os.path.exists(os.path.join(os.environ["CLAX_PRETRAIN_CACHE"], cache.name))
    assert open(shared, "rb").read() == cache.read_bytes()  # written there when the run pretrained
    monkeypatch.setattr(pretrain, "_MEMO", {})
    calls = []
    real = pretrain.pretrain
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    fresh = tmp_path / "fresh"
    assert main(CLR + ["--workdir", str(fresh)]) == 0, capsys.readouterr().err[-2000:]
    again = json.loads((fresh / "results.json").read_text())
    assert calls == [] and again["pretrain"]["cached"] == shared
    assert again["accuracy_matrix"] == res["accuracy_matrix"]
    assert (fresh / "pretrain" / cache.name).read_bytes() == cache.read_bytes()  # the workdir stands alone
    monkeypatch.setattr(pretrain, "_MEMO", {})
    off = tmp_path / "off"
    assert main(CLR + ["--workdir", str(off), "--set", "cache.pretrain=false"]) == 0, capsys.readouterr().err[-2000:]
    assert calls == [1] and "cached" not in json.loads((off / "results.json").read_text())["pretrain"]
