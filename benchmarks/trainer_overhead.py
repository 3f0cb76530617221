"""Where the trainer's compiled step spends time beyond a plain Flax + optax step of the same network
(issue 17, item 7: on an H100 the ViT-B/16 trainer step was 1.09x the plain step).

Both steps are the ones ``benchmarks/gpu_steps.py`` times: the trainer's ``finetune`` step at task 2
(TIL, after ``begin_task``) and :func:`gpu_steps.plain_program`'s step. For each it reports

- XLA's cost analysis of the compiled program (flops, bytes accessed) and its number of argument leaves;
- ``blocked``: the median step, waiting for each step's result (what ``gpu_steps.py`` reports);
- ``pipelined``: ``iters`` steps dispatched back to back, waiting once at the end, per step: the
  device's time per step once the host's dispatch overlaps it;
- ``dispatch``: the median time the call takes to return (the host's share, before the device is done);
- with ``--trace DIR``: a JAX profiler trace of ``--trace-steps`` steps of each, and from it the device's
  busy time per step and its 12 costliest operations (from the trace's Perfetto JSON).

    python benchmarks/trainer_overhead.py --backbone vit_b16 --trace /tmp/trace --json overhead.json
    python benchmarks/trainer_overhead.py --quick            # tiny shapes: a CPU smoke test
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_steps as G  # noqa: E402  (the same shapes, programs and lock as the step table)


def device_ops(trace_dir: str, steps: int, top: int = 12) -> dict:
    """The device's busy time per step and its ``top`` costliest operations, read from the Perfetto JSON of
    the newest JAX profiler trace under ``trace_dir`` (events on a ``/device:`` process: a CPU run has
    none, so there they are empty), and the median time of the host's call of the compiled program."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        return {"error": f"no perfetto_trace.json.gz under {trace_dir}"}
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = {pid for pid, name in procs.items() if name.startswith("/device:")}
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev and "dur" in e]
    by_name = collections.Counter()
    count = collections.Counter()
    for e in spans:
        by_name[e["name"]] += e["dur"]
        count[e["name"]] += 1
    host = [e["dur"] for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("PjitFunction")]
    return {"trace": files[-1], "device_processes": sorted(procs[p] for p in dev),
            "device_busy_ms_per_step": sum(by_name.values()) / 1e3 / steps,
            "device_ops_per_step": len(spans) / steps,
            "top_ms_per_step": [(name[:160], round(us / 1e3 / steps, 4), count[name] // steps)
                                for name, us in by_name.most_common(top)],
            "host_call_ms": round(statistics.median(host) / 1e3, 4) if host else None}


def measure(step, args, iters: int, trace_dir: str | None, trace_steps: int) -> dict:
    """The figures of one jitted ``step(*args) -> (args, out)`` (see the module's docstring)."""
    import jax

    compiled = step.lower(*args).compile()
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
    st = {"a": args}

    def call():
        st["a"], out = step(*st["a"])
        return out

    for _ in range(3):
        jax.block_until_ready(call())
    res = {"flops": ca.get("flops"), "bytes_accessed": ca.get("bytes accessed"),
           "arg_leaves": len(jax.tree.leaves(args))}
    with G.device_lock():
        blocked, dispatch, piped = [], [], []
        for _ in range(iters):
            t0 = time.perf_counter()
            out = call()
            t1 = time.perf_counter()
            jax.block_until_ready((st["a"], out))
            blocked.append(time.perf_counter() - t0)
            dispatch.append(t1 - t0)
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(iters):
                out = call()
            jax.block_until_ready((st["a"], out))
            piped.append((time.perf_counter() - t0) / iters)
        res.update(blocked_ms=statistics.median(blocked) * 1e3, dispatch_ms=statistics.median(dispatch) * 1e3,
                   pipelined_ms=min(piped) * 1e3)
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(trace_steps):
                    jax.block_until_ready(call())
            res["trace"] = device_ops(trace_dir, trace_steps)
    return res


def trainer_program(backbone: dict, size: int, batch: int):
    """``(step, args)`` of the trainer's ``finetune`` step at task 2, in :func:`measure`'s form."""
    from _timing import prepared_step

    meth, bench, tc = G.method_setup("finetune", backbone, size)
    steps, ts, b, tt = prepared_step(meth, bench, t=1, batch_size=batch, begin_task=True, cfg=tc)

    class Step:  # the compiled train step with the batch and task bound, as measure() calls it
        def lower(self, ts):
            return steps._train.lower(ts, b, tt)

        def __call__(self, ts):
            ts, metrics = steps.train_step(ts, b, tt)
            return (ts,), metrics["loss"]

    return Step(), (ts,)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=sorted(G.SHAPES), default="vit_b16")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the script, not a figure")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--trace", help="write a profiler trace of each step under this folder and summarise it")
    ap.add_argument("--trace-steps", type=int, default=5)
    ap.add_argument("--json", help="also write every figure to this file")
    a = ap.parse_args(argv)
    G.share_device()
    import jax

    bb, size, batch = (G.QUICK if a.quick else G.SHAPES)[a.backbone]
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "backbone": a.backbone,
           "batch": batch, "size": size}
    for side, build in (("trainer", trainer_program), ("plain", G.plain_program)):
        step, args = build(bb, size, batch)
        out[side] = measure(step, args, a.iters, a.trace and os.path.join(a.trace, side), a.trace_steps)
        print(f"{side}: " + json.dumps({k: v for k, v in out[side].items() if k != "trace"}), file=sys.stderr,
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    t, p = out["trainer"], out["plain"]
    print(f"{a.backbone} (batch {batch}) on {out['device']}, JAX {out['jax']}")
    print("| | trainer | plain | trainer / plain |\n|---|---|---|---|")
    for k in ("blocked_ms", "pipelined_ms", "dispatch_ms", "flops", "bytes_accessed", "arg_leaves"):
        if t.get(k) is not None and p.get(k):
            print(f"| {k} | {t[k]:.4g} | {p[k]:.4g} | {t[k] / p[k]:.3f}x |")
    for side in ("trainer", "plain"):
        tr = out[side].get("trace")
        if tr and "top_ms_per_step" in tr:
            print(f"\n{side}: device busy {tr['device_busy_ms_per_step']:.3f} ms/step, "
                  f"{tr['device_ops_per_step']:.0f} ops/step, host call {tr['host_call_ms']} ms")
            for name, ms, n in tr["top_ms_per_step"]:
                print(f"  {ms:8.4f} ms x{n}  {name}")


if __name__ == "__main__":
    main()
