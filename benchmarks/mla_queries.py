"""The MLA queries kernel against the three launches it replaces, at DeepSeek-V3's widths.

    python3 -W ignore benchmarks/mla_queries.py --configs "nw=8,rq=4;nw=16,rq=3" --json out.json

One decode token, 128 heads, bf16, 4-bit group 64: q_b_proj (its q_a norm folded), the MLA
prologue and embed_q as kernels/qgemv.py, kernels/mla_prep.py and kernels/qgemv_lanes.py run
them, then kernels/mla_queries.py in each launch config. GPU µs per call from the kernels'
own durations (CUPTI, through torch.profiler), eval-only µs per call over rotating weights,
and GB/s of the weights read.
"""

import json
import sys
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from gpu_profile import gpu_us  # noqa: E402
from mlxkt.kernels import mla_prep, mla_queries  # noqa: E402
from mlxkt.kernels.dispatch import gpu_backend  # noqa: E402
from mlxkt.kernels.qgemv import quantized_gemv  # noqa: E402
from mlxkt.kernels.qgemv_lanes import lanes_gemv  # noqa: E402

H, QA, NOPE, P, R, OFFSET, SCALE = 128, 1536, 128, 64, 512, 1000, 0.1352


def eval_us(fn, ins, iters=50, reps=5):
    """Median µs per call of `iters` queued calls, graphs built before the clock starts."""
    mx.eval([fn(*ins[i % len(ins)]) for i in range(len(ins))])
    times = []
    for _ in range(reps):
        outs = [fn(*ins[i % len(ins)]) for i in range(iters)]
        t0 = time.perf_counter()
        mx.eval(outs)
        times.append((time.perf_counter() - t0) / iters * 1e6)
    return sorted(times)[reps // 2]


def parse(configs: str) -> list:
    return [{k: int(v) for k, v in (kv.split("=") for kv in c.split(","))} if c else {}
            for c in configs.split(";")]


def main(configs: str = "nw=8,rq=4;nw=8,rq=6;nw=16,rq=3;nw=16,rq=6;nw=4,rq=12",
         problems: int = 4, json_out: str = typer.Option(None, "--json")):
    backend = gpu_backend()
    if backend is None:
        raise SystemExit("needs a GPU")
    rope = nn.RoPE(P, traditional=True, base=10000)
    table = mla_prep.rope_table(rope, P)
    ins = [mla_queries.random_problem(H, QA, NOPE, P, R, dtype=mx.bfloat16, seed=s)
           for s in range(problems)]
    mx.eval(ins)
    weights = sum(a.nbytes for a in (ins[0][1].weight, ins[0][1].scales, ins[0][1].biases,
                                     ins[0][3].weight, ins[0][3].scales, ins[0][3].biases))

    def chain(a, q_b, q_norm, embed_q, kv_norm):
        q = quantized_gemv(a[..., :QA], q_b, backend, norm=q_norm)
        qn, qp, lat, kp = mla_prep.mla_prep(q, a[..., QA:], kv_norm, OFFSET, table, H, NOPE, P,
                                            SCALE, backend, rows=True)
        q_lat = lanes_gemv(qn, embed_q.weight, embed_q.scales, embed_q.biases, embed_q.bits,
                           embed_q.group_size, backend, heads=True, shape=(1, 1, H, R))
        return q_lat, qp, lat, kp

    rows = [("three launches", chain)]
    for cfg in parse(configs):
        rows.append((",".join(f"{k}={v}" for k, v in cfg.items()) or "default",
                     lambda *p, cfg=cfg: mla_queries.mla_queries(*p, table, OFFSET, H, NOPE, P,
                                                                 SCALE, backend, **cfg)))
    want = chain(*ins[0])
    result = {"backend": backend, "device": str(mx.default_device()), "weights_mb": weights / 1e6,
              "rows": []}
    print(f"{'launch':16} {'GPU us':>8} {'eval us':>8} {'GB/s':>7} {'max diff':>9}")
    for name, fn in rows:
        try:
            got = fn(*ins[0])
            diff = max(mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item()
                       for g, w in zip(got, want))
            g_us = gpu_us(fn, ins, 40)
            e_us = eval_us(fn, ins)
        except Exception as e:  # a config that does not build or launch
            print(f"{name:16} failed: {type(e).__name__}: {e}")
            result["rows"].append({"launch": name, "failed": str(e)})
            continue
        gbps = weights / (g_us * 1e3) if g_us else None
        print(f"{name:16} {g_us or float('nan'):8.1f} {e_us:8.1f} {gbps or float('nan'):7.0f} "
              f"{diff:9.2e}")
        result["rows"].append({"launch": name, "gpu_us": g_us, "eval_us": e_us, "gbps": gbps,
                               "max_diff": diff})
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    typer.run(main)
