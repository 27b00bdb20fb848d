"""One DeepSeek-V3 MoE layer's routed experts: fused kernels vs the plain-MLX reference.

Prints a table and JSON: µs per call, GB/s of expert weights read (each selected expert's
gate/up/down weights, scales and biases once) and that as a fraction of the copy bandwidth
MLX reaches on this GPU (measured here, bytes read + written). Needs a Metal or CUDA GPU.
Two timings per row: `call` includes building MLX's lazy graph in Python (what a caller pays
per call), `eval` starts the clock once the graphs are built (GPU work and launches); GB/s,
the fraction of copy bandwidth and the speed-up use `eval`.

    python benchmarks/kernels.py [--tokens 1,2,4,8] [--bits 4,8] [--json out.json]
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxkt.kernels.dispatch import gpu_backend  # noqa: E402
from mlxkt.kernels.moe import fused_routed_experts, fused_stages  # noqa: E402
from mlxkt.kernels.probe import random_problem, reference_float32, relative_error  # noqa: E402
from mlxkt.kernels.reference import routed_experts_reference  # noqa: E402
from mlxkt.kernels.selftest import median_time, routings  # noqa: E402

D, I, E, K = 7168, 2048, 256, 8  # DeepSeek-V3


def copy_bandwidth(nbytes=2**30):
    a = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(a)
    t = median_time(lambda v: -v, [(a,)], iters=10)
    return 2 * nbytes / t


def expert_bytes(*layers):
    return sum((m.weight.nbytes + m.scales.nbytes + m.biases.nbytes) / m.weight.shape[0]
               for m in layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--sweep", action="store_true", help="also try other launch configs at 1 token")
    ap.add_argument("--json")
    args = ap.parse_args()
    backend = gpu_backend()
    if backend is None:
        sys.exit("benchmarks/kernels.py needs a Metal or CUDA GPU")
    copy_bw = copy_bandwidth()
    print(f"device {mx.device_info().get('device_name', '?')}, backend {backend}, "
          f"MLX copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = []

    def timed(what, bits, n, fn, sets, moved, **extra):
        call = median_time(fn, sets)
        ev = median_time(fn, sets, prebuilt=True)
        rows.append({"what": what, "bits": bits, "tokens": n, "call_us": call * 1e6,
                     "us": ev * 1e6, "gb_s": moved / ev / 1e9, **extra})

    for bits in [int(b) for b in args.bits.split(",")]:
        x, _, _, gate, up, down = random_problem(D, I, 1, K, E, bits=(bits, bits),
                                                 dtype=mx.bfloat16, repeat=False)
        per_expert = expert_bytes(gate, up, down)
        # One gather_qmm (gate_proj) for 1 token: the baseline the issue quotes.
        r1 = routings(E, 1, K, 16)
        timed("gather_qmm gate_proj", bits, 1, lambda a, i: gate(a.reshape(-1, 1, 1, D), i),
              [(x[:1], i) for i, _ in r1], K * expert_bytes(gate))
        for n in [int(t) for t in args.tokens.split(",")]:
            xn = mx.random.normal((n, D)).astype(mx.bfloat16)
            sets = [(xn, i, s) for i, s in routings(E, n, K, 16, seed=n)]
            uniq = np.mean([len(np.unique(np.array(i))) for _, i, _ in sets])
            y = fused_routed_experts(*sets[0], gate, up, down, backend)
            err = relative_error(y, reference_float32(*sets[0], gate, up, down))
            configs = [{}]
            if args.sweep and n == 1:
                configs += [{"rt": 2}, {"nw": (4, 8)}, {"nw": (8, 8), "rt": 2}]
            for cfg in configs:
                timed(f"fused {cfg or ''}".strip(), bits, n,
                      lambda a, b, c: fused_routed_experts(a, b, c, gate, up, down, backend, **cfg),
                      sets, uniq * per_expert, rel_error=err)
            # Stage 1 alone (gate/up + SwiGLU): the rest of the fused time is stage 2.
            timed("fused stage 1 (gate/up)", bits, n,
                  lambda a, b, c: fused_stages(a, b, c, gate, up, down, backend)[0][0],
                  sets, uniq * expert_bytes(gate, up))
            timed("reference", bits, n,
                  lambda a, b, c: routed_experts_reference(a, b, c, gate, up, down),
                  sets, uniq * per_expert)
        mx.clear_cache()
    ref_us = {(r["bits"], r["tokens"]): r["us"] for r in rows if r["what"] == "reference"}
    print(f"{'what':28} {'bits':>4} {'tok':>3} {'call us':>8} {'eval us':>8} {'GB/s':>7} "
          f"{'of copy':>7} {'vs ref':>7}")
    for r in rows:
        r["of_copy"] = r["gb_s"] * 1e9 / copy_bw
        ref = ref_us.get((r["bits"], r["tokens"]))
        fused = r["what"] == "fused" or r["what"].startswith("fused {")
        r["speedup"] = ref / r["us"] if ref and fused else None
        sp = f"{r['speedup']:6.2f}x" if r["speedup"] else ""
        print(f"{r['what']:28} {r['bits']:>4} {r['tokens']:>3} {r['call_us']:8.1f} "
              f"{r['us']:8.1f} {r['gb_s']:7.0f} {r['of_copy']:7.0%} {sp:>7}")
    out = {"device": mx.device_info().get("device_name"), "backend": backend,
           "mlx": mx.__version__, "copy_gb_s": copy_bw / 1e9, "rows": rows}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
