"""The device lock of ``benchmarks/gpu_steps.py``: processes compile side by side but time alone, and a
process waiting to time is not overtaken by processes that start after it (a starved figure timed out on
the H100 before the gate)."""
import fcntl
import os
import subprocess
import sys
import time

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

# process B: shares the device (compiling), then times under the exclusive lock until GO appears
TIMER = """
import os, sys, time
sys.path.insert(0, {bench!r})
import gpu_steps as G
G.share_device()
open({ready!r}, "w").close()
with G.device_lock():
    open({timing!r}, "w").close()
    while not os.path.exists({go!r}):
        time.sleep(0.01)
"""


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def _can(path: str, op: int) -> bool:
    """Whether a new open file description of ``path`` gets lock ``op`` at once (then drops it)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, op | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_timing_waits_for_compilers_and_keeps_newcomers_out(tmp_path):
    lock = str(tmp_path / "lock")
    ready, timing, go = (str(tmp_path / n) for n in ("ready", "timing", "go"))
    with open(lock, "a") as compiling:  # process A: compiling, holds the lock shared
        fcntl.flock(compiling, fcntl.LOCK_SH)
        b = subprocess.Popen([sys.executable, "-c", TIMER.format(bench=BENCH, ready=ready, timing=timing, go=go)],
                             env={**os.environ, "CLAX_BENCH_LOCK": lock})
        try:
            _wait(lambda: os.path.exists(ready), "B to share the device")
            _wait(lambda: not _can(lock + ".gate", fcntl.LOCK_EX), "B to wait at the gate")
            time.sleep(0.2)
            assert not os.path.exists(timing), "B timed while A was still compiling"
            assert not _can(lock + ".gate", fcntl.LOCK_EX), "a newcomer could pass the gate ahead of B"
            fcntl.flock(compiling, fcntl.LOCK_UN)  # A done compiling: B may time now
            _wait(lambda: os.path.exists(timing), "B to time")
            assert not _can(lock, fcntl.LOCK_SH), "another process could use the device while B timed"
            assert _can(lock + ".gate", fcntl.LOCK_EX), "B kept the gate while timing"
            open(go, "w").close()
            assert b.wait(30) == 0
            assert _can(lock, fcntl.LOCK_EX), "B's exit left the lock held"
        finally:
            if b.poll() is None:
                b.kill()
