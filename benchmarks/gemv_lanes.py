"""Short-row and per-head quantized GEMVs at decode: mlxkt's lanes kernel
(metal/qgemv_lanes.inc) vs MLX's quantized matmul, and vs mlxkt's block-per-row GEMV
(qgemv.inc) for one matrix. DeepSeek-V3 shapes, 4-bit group 64, bf16. Eval-only µs per call
(graphs built first), as a fraction of MLX's copy bandwidth measured in the same process;
each timing rotates over copies of the weights (up to 16, > 50 MB) so they do not sit in L2. On CUDA
with torch, also the kernels' own GPU µs per call (CUPTI): a 5 MB call is over in a few µs,
less than MLX's host takes to launch it, so eval-only µs there measure the host.

    python benchmarks/gemv_lanes.py [--tokens 1,2] [--configs "lpr=8;nw=2,rpl=4"] [--json F]
"""

import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gemv.py, gpu_profile.py

from mlxkt.kernels import qgemv, qgemv_lanes as ql  # noqa: E402
from mlxkt.kernels.dispatch import probe_tolerance  # noqa: E402
from mlxkt.kernels.probe import relative_error  # noqa: E402
from mlxkt.kernels.selftest import median_time  # noqa: E402
from gemv import parse_configs, setup  # noqa: E402
from gpu_profile import gpu_us  # noqa: E402

SHAPES = {  # name: (heads or 0 for one matrix, out per head, in)
    "embed_q": (128, 512, 128), "unembed_out": (128, 128, 512), "q_b_proj": (0, 24576, 1536),
}


def main():
    a, backend, copy = setup(__doc__, SHAPES)
    rows = []
    for name in a.shapes.split(","):
        H, O, D = SHAPES[name]
        def make(seed):
            w, s, b = ql.random_heads(max(H, 1), O, D, 4, 64, mx.bfloat16, seed=seed)
            return (w, s, b) if H else (w[0], s[0], b[0])
        first = make(0)
        nbytes = sum(t.nbytes for t in first)
        mats = [first] + [make(i) for i in range(1, max(1, min(16, int(2e8 // nbytes) + 1)))]
        ins = [(m,) for m in mats]
        for N in map(int, a.tokens.split(",")):
            x = mx.random.normal((H, N, D) if H else (N, D)).astype(mx.bfloat16)
            ref32 = ql.reference(x.astype(mx.float32), first[0], *(t.astype(mx.float32)
                                 for t in first[1:]), 4, 64)

            def timed(fn):
                return median_time(fn, ins, iters=len(ins) * 2, prebuilt=True)

            ref = lambda m: ql.reference(x, *m, 4, 64)  # noqa: E731
            t_ref = timed(ref)
            row = {"shape": name, "heads": H, "out": O, "in": D, "tokens": N,
                   "mb": nbytes / 1e6, "mlx_us": t_ref * 1e6, "mlx_copy_frac": nbytes / t_ref / copy,
                   "mlx_gpu_us": gpu_us(ref, ins, len(ins) * 4)}
            runs = [(",".join(f"{k}={v}" for k, v in c.items()) or "lanes",
                     lambda m, c=c: ql.lanes_gemv(x, *m, 4, 64, backend, bool(H), **c))
                    for c in parse_configs(a.configs)]
            if not H:  # the block-per-row kernel on the same matrix
                layers = [qgemv.linear_like(qgemv.random_linear(64, 64), weight=m[0],
                                            scales=m[1], biases=m[2]) for m in mats]
                lmap = {id(m[0]): lay for m, lay in zip(mats, layers)}
                runs.append(("qgemv", lambda m: qgemv.quantized_gemv(x, lmap[id(m[0])], backend)))
            for key, fn in runs:
                try:
                    err = relative_error(fn(first), ref32)
                    t = timed(fn)
                except Exception as e:  # a config that does not build
                    row[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    continue
                row[key] = {"us": t * 1e6, "copy_frac": nbytes / t / copy, "speedup": t_ref / t,
                            "rel_error": err, "ok": err < probe_tolerance(mx.bfloat16),
                            "gpu_us": gpu_us(fn, ins, len(ins) * 4)}
            rows.append(row)
            g = lambda v: "" if v is None else f", GPU {v:.1f}"  # noqa: E731
            print(f"{name:12s} H={H:<3d} {O:6d}x{D:<5d} N={N} {nbytes / 1e6:6.1f} MB  mlx "
                  f"{t_ref * 1e6:6.1f} us ({row['mlx_copy_frac']:.0%}{g(row['mlx_gpu_us'])})  "
                  + "  ".join(
                      f"{k}: {v['us']:.1f} us ({v['copy_frac']:.0%}, {v['speedup']:.2f}x"
                      f"{g(v['gpu_us'])}{'' if v['ok'] else ' BAD'})" if "us" in v
                      else f"{k}: {v['error']}" for k, v in row.items() if isinstance(v, dict)))
    if a.json:
        Path(a.json).write_text(json.dumps({"copy_gbps": copy / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
