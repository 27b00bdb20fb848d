"""Why an MTP cycle costs more than its share on a GPU: each piece of a cycle on a converted
model (e.g. dsv3-code-tiny), kernel by kernel (CUPTI through torch.profiler) and host time.

    python benchmarks/mtp_profile.py --model DIR [--calls 20] [--json out.json]

Pieces: a plain 1-token step, the 2-token verify forward, the MTP layer over 2 positions, and
a whole cycle. For each: kernels per call, GPU busy µs per call, the host's graph build and
`async_eval` time, the wall time of a synchronous call, and the kernels by name. On a tiny
model every piece is bound by the host, so kernels per call is what to cut.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from gpu_profile import busy_us, kernel_events, short  # noqa: E402
from mtp import HELD_OUT, cycle_pieces  # noqa: E402


def measure(fn, trim, calls: int) -> dict:
    def once(rows=None):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        for c, k in trim:
            c.trim(k)
        if rows is not None:
            rows.append((t1 - t0, t2 - t1, t3 - t0))

    for _ in range(3):
        once()  # warm: compiled traces, kernel builds
    rows = []
    for _ in range(calls):
        once(rows)
    med = [1e3 * sorted(c)[len(c) // 2] for c in zip(*rows)]
    res = {"build_ms": med[0], "async_eval_ms": med[1], "sync_call_ms": med[2],
           "kernels": float("nan"), "gpu_busy_us": float("nan"), "by_name": {}}
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():  # host times only
        return res
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            once()
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "trace.json"
        prof.export_chrome_trace(str(f))
        spans = kernel_events(f)
    by_name = {}
    for s, e, name in spans:
        k = short(name, 70)
        c, t = by_name.get(k, (0, 0.0))
        by_name[k] = (c + 1, t + e - s)
    return {
        **res, "kernels": len(spans) / calls, "gpu_busy_us": busy_us(spans) / calls,
        "by_name": {k: [c / calls, t / calls] for k, (c, t) in
                    sorted(by_name.items(), key=lambda kv: -kv[1][0])},
    }


def main(model: str = typer.Option(..., help="converted model with mtp.safetensors"),
         calls: int = 20, json_out: str = typer.Option(None, "--json")):
    import mlxkt

    m, tok = mlxkt.load(model)
    if "mtp" not in m:
        raise SystemExit(f"{model} has no MTP layer")
    prompt = mx.array(tok.encode(HELD_OUT))[:200]
    res = {name: measure(fn, trim, calls) for name, (fn, trim) in cycle_pieces(m, prompt).items()}
    base = res["step_1"]
    print(f"{'piece':12} {'kernels':>8} {'x step':>7} {'GPU µs':>8} {'build ms':>9} "
          f"{'async_eval ms':>14} {'sync call ms':>13} {'x step':>7}")
    for name, r in res.items():
        print(f"{name:12} {r['kernels']:8.1f} {r['kernels'] / base['kernels']:7.2f} "
              f"{r['gpu_busy_us']:8.1f} {r['build_ms']:9.3f} {r['async_eval_ms']:14.3f} "
              f"{r['sync_call_ms']:13.3f} {r['sync_call_ms'] / base['sync_call_ms']:7.2f}")
    for name, r in res.items():
        print(f"\n== {name}: kernels per call by name (count, GPU µs)")
        for k, (c, t) in r["by_name"].items():
            print(f"   {c:5.1f} {t:8.1f}  {k}")
    if json_out:
        Path(json_out).write_text(json.dumps({"model": model, "device": str(mx.default_device()),
                                              "pieces": res}, indent=1))


if __name__ == "__main__":
    typer.run(main)
