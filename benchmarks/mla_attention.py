"""One-token MLA decode attention over the compressed cache at DeepSeek-V3's shapes (128
heads, latent 512, rope 64, bf16): the MLA decode kernels (mlxkt/kernels/mla_decode.py),
eager and compiled, against the engine's plain path (rope-score matmul + MLX's attention
fallback). Eval-only µs per call (graphs built first), host µs per call (building the graph,
`async_eval` returning), and the cache's bytes read per µs. Each timing rotates over 8 caches
(the layers of the bench slice), so a short cache is not always in L2. Needs a Metal or CUDA GPU.

    python benchmarks/mla_attention.py [--contexts 1024,4096,8192,32768] [--configs "blocks=256;hg=4,kpt=2"]
"""

import argparse
import json
import math
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import host_us, parse_configs  # noqa: E402
from mlxkt.kernels import mla_decode as M  # noqa: E402
from mlxkt.kernels.dispatch import gpu_backend  # noqa: E402
from mlxkt.kernels.probe import relative_error  # noqa: E402
from mlxkt.kernels.selftest import median_time  # noqa: E402

H, R, P = 128, 512, 64
LAYERS = 8


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--configs", default="", help="extra launch configs (hg, nw, kpt, blocks), ';'-separated")
    ap.add_argument("--json")
    a = ap.parse_args()
    backend = gpu_backend()
    if backend is None:
        sys.exit("needs a Metal or CUDA GPU (MLX's default device is the CPU)")
    scale = 1.0 / math.sqrt(R + P)
    plain = M.plain_attention  # the engine's path without the kernels

    rows_out = []
    print(f"{'keys':>6} {'plain us':>9} {'kernel us':>10} {'speed-up':>8} {'GB/s':>7}  host µs build/async_eval: plain | kernel eager | compiled")
    for S in map(int, a.contexts.split(",")):
        rows = 256 * math.ceil((S + 1) / 256)
        caches = [M.random_problem(1, H, R, P, rows, mx.bfloat16, seed=i) for i in range(LAYERS)]
        mx.eval(caches)
        q, qpe = caches[0][0], caches[0][1]
        ins = [(c[2], c[3]) for c in caches]
        nbytes = S * (R + P) * 2
        ref = M.reference(q, qpe, ins[0][0], ins[0][1], S, scale)
        t_plain = median_time(lambda kv, kpe: plain(q, qpe, kv, kpe, S, scale), ins, iters=16, prebuilt=True)
        row = {"keys": S, "rows": rows, "plain_us": 1e6 * t_plain,
               "plain_error": relative_error(plain(q, qpe, *ins[0], S, scale), ref.astype(mx.float32)),
               "plain_host": host_us(lambda kv, kpe: plain(q, qpe, kv, kpe, S, scale), ins * 4)}
        for cfg in parse_configs(a.configs):
            key = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
            meta = M.decode_meta(S, rows, H, **cfg)
            sc = M.scale_array(scale)

            def run(kv, kpe):
                return M.mla_decode(q, qpe, kv, kpe, meta, sc, backend, **cfg)

            compiled = mx.compile(lambda q_, p_, kv, kpe, m: M.mla_decode(q_, p_, kv, kpe, m, sc, backend, **cfg))
            try:
                err = relative_error(run(*ins[0]), ref.astype(mx.float32))
                t = median_time(run, ins, iters=16, prebuilt=True)
                row[key] = {"us": 1e6 * t, "speedup": t_plain / t, "gbps": nbytes / t / 1e9,
                            "rel_error": err, "host": host_us(run, ins * 4),
                            "compiled_host": host_us(lambda kv, kpe: compiled(q, qpe, kv, kpe, meta), ins * 4)}
            except Exception as e:  # a config that does not build
                row[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
                print(f"{S:6d} {key}: {row[key]['error']}")
                continue
            r = row[key]
            print(f"{S:6d} {1e6 * t_plain:9.1f} {r['us']:10.1f} {r['speedup']:7.2f}x {r['gbps']:7.1f}  "
                  f"{row['plain_host']['build_us']:.1f}/{row['plain_host']['async_eval_us']:.1f} | "
                  f"{r['host']['build_us']:.1f}/{r['host']['async_eval_us']:.1f} | "
                  f"{r['compiled_host']['build_us']:.1f}/{r['compiled_host']['async_eval_us']:.1f}"
                  f"  [{key}] err {err:.1e} (plain {row['plain_error']:.1e})")
        rows_out.append(row)
        del caches, ins
        mx.clear_cache()
    if a.json:
        Path(a.json).write_text(json.dumps({"backend": backend, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
