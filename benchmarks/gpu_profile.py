"""Where a decode step's time goes on an NVIDIA GPU, kernel by kernel (CUPTI through
torch.profiler, which records every kernel of the process, MLX's included).

    python benchmarks/gpu_profile.py --layers 8 --experts 32 --context 1024 --json out.json

For each engine (mlxkt, mlx-lm) on the same synthetic real-width slice as benchmarks/bench.py:
wall ms per token of its own pipelined decode loop, GPU busy ms per token (union of kernel
intervals), kernels per token, the host time to build one step's graph and to hand it to
MLX (`async_eval` returning), and the kernels that take the most time. A step whose GPU busy
time is well under its wall time is bound by the host or by gaps between kernels, not by
the kernels themselves.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlxkt.bench.variants import apply_variant  # noqa: E402

from mlxkt.bench import measure  # noqa: E402
from mlxkt.bench.synth import slice_config, write_model_in_child  # noqa: E402


def kernel_events(trace_file: Path) -> list:
    """(start µs, end µs, name) of every GPU kernel, memcpy and memset in a chrome trace."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    out = [(e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in events
           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e]
    return sorted(out)


def gpu_us(fn, ins, iters):
    """GPU µs per call: kernel durations summed (CUPTI through torch.profiler), or None."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    outs = [fn(*ins[i % len(ins)]) for i in range(iters)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mx.eval(outs)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "trace.json"
        prof.export_chrome_trace(str(f))
        spans = kernel_events(f)
    return sum(e - s for s, e, _ in spans) / iters if spans else None


def busy_us(spans) -> float:
    """Length of the union of [start, end) intervals (sorted by start)."""
    total, end = 0.0, -1e30
    for s, e, _ in spans:
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def short(name: str, n: int = 90) -> str:
    name = name.split("(")[0]
    return name if len(name) <= n else name[: n - 3] + "..."


def profile_decode(engine, context: int, tokens: int, skip: int = 4, top: int = 40) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cache = measure.fill_cache(engine, context - 1)
    stamps = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in engine.stream(mx.array([3]), cache, tokens + skip):
            stamps.append(time.perf_counter())
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "trace.json"
        prof.export_chrome_trace(str(f))
        spans = kernel_events(f)
    if not spans:
        raise RuntimeError("the profiler recorded no GPU kernels (is MLX on a CUDA GPU?)")
    # Steady window: the kernels of the last `tokens` steps, taken as the last fraction of
    # the kernel stream (each decode step launches the same kernels).
    n_all = tokens + skip
    per_step = len(spans) / n_all
    steady = spans[int(round(skip * per_step)):]
    wall = (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)
    window_us = steady[-1][1] - steady[0][0]
    by_name = {}
    for s, e, name in steady:
        k = short(name)
        c, t = by_name.get(k, (0, 0.0))
        by_name[k] = (c + 1, t + e - s)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "context": context, "tokens": tokens,
        "wall_ms_per_token": 1e3 * wall,
        "gpu_window_ms_per_token": window_us / 1e3 / tokens,
        "gpu_busy_ms_per_token": busy_us(steady) / 1e3 / tokens,
        "kernel_sum_ms_per_token": sum(e - s for s, e, _ in steady) / 1e3 / tokens,
        "kernels_per_token": len(steady) / tokens,
        "top": [{"name": k, "per_token": c / tokens, "us_per_token": t / tokens}
                for k, (c, t) in top],
    }


def host_costs(engine, context: int, reps: int = 10) -> dict:
    """Unpipelined steps: build the graph, hand it to MLX, wait for it (medians, ms)."""
    cache = measure.fill_cache(engine, context - 1)
    tok = mx.array([[3]])
    rows = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        y = engine.model(tok, cache=cache)[:, -1].argmax(-1)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    rows = rows[2:]
    med = [1e3 * sorted(c)[len(c) // 2] for c in zip(*rows)]
    return dict(zip(["build_ms", "async_eval_ms", "wait_ms", "step_ms"], med))


def graph_nodes(y) -> dict:
    """Unevaluated nodes of y's graph by primitive: what async_eval walks. Views and reshapes
    count too: MLX spends host time on every node, kernel or not."""
    return measure.op_counts(measure.graph_ops(y))


def host_profile(engine, context: int, reps: int = 20, top: int = 25) -> dict:
    """cProfile of `reps` unpipelined graph builds (the Python side of a step) and the graph's
    nodes by primitive."""
    import cProfile
    import io
    import pstats

    cache = measure.fill_cache(engine, context - 1)
    tok = mx.array([[3]])
    mx.eval(engine.model(tok, cache=cache))
    prof = cProfile.Profile()
    for _ in range(reps):
        prof.enable()
        y = engine.model(tok, cache=cache)[:, -1].argmax(-1)
        prof.disable()
        nodes = graph_nodes(y)
        mx.eval(y)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return {"nodes": nodes, "nodes_total": sum(nodes.values()), "cprofile": out.getvalue()}


def main(layers: int = 8, experts: int = 32, context: int = 1024, tokens: int = 32,
         engines: str = "mlxkt,mlx-lm", top: int = 40, workdir: str = "/tmp/w8",
         json_out: str = typer.Option(None, "--json"),
         host: bool = typer.Option(False, help="also cProfile the graph build, count its nodes")):
    config = slice_config("dsv3", layers, experts)
    path = write_model_in_child(Path(workdir) / f"synth-dsv3-{layers}l-{experts}e-4b", config)
    made = {"mlxkt": measure.mlxkt_engine, "mlx-lm": measure.mlx_lm_engine}
    result = {"context": context, "copy_gbps": measure.copy_bandwidth(int(2e9)), "engines": {}}
    for name in engines.split(","):  # "mlxkt+VARIANT" applies a bench variant
        base, _, variant = name.partition("+")
        e = made[base](path)
        if variant:
            apply_variant(e, variant)
        t0 = time.perf_counter()
        measure.time_decode(e, 64, 4)  # warm-up: compiles kernels
        r = {"warmup_s": time.perf_counter() - t0,
             "active_gb": measure.active_bytes(e.model)["per_token"] / 1e9}
        r["host"] = host_costs(e, context)
        if host:
            r["host_profile"] = host_profile(e, context)
        r["profile"] = profile_decode(e, context, tokens, top=top)
        result["engines"][name] = r
        del e
        mx.clear_cache()
    for name, r in result["engines"].items():
        p, h = r["profile"], r["host"]
        print(f"\n== {name} @{context}: wall {p['wall_ms_per_token']:.2f} ms/token, GPU busy "
              f"{p['gpu_busy_ms_per_token']:.2f}, window {p['gpu_window_ms_per_token']:.2f}, "
              f"kernels/token {p['kernels_per_token']:.0f}, weights at copy BW "
              f"{r['active_gb'] / result['copy_gbps'] * 1e3:.2f} ms")
        print(f"   unpipelined step: build {h['build_ms']:.2f} ms, async_eval {h['async_eval_ms']:.2f}, "
              f"wait {h['wait_ms']:.2f}, total {h['step_ms']:.2f}")
        print(f"   {'us/token':>9} {'n/token':>7}  kernel")
        for t in p["top"]:
            print(f"   {t['us_per_token']:9.1f} {t['per_token']:7.1f}  {t['name']}")
        if "host_profile" in r:
            hp = r["host_profile"]
            print(f"   graph nodes per step: {hp['nodes_total']}: " +
                  ", ".join(f"{k} {v}" for k, v in hp["nodes"].items()))
            print(hp["cprofile"])
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    typer.run(main)
