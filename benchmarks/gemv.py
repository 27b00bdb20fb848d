"""Dense quantized linear layers at decode sizes: mlxkt's GEMV kernel vs MLX's quantized
matmul (`qmv`), at DeepSeek-V3's shapes. Eval-only µs per call (graphs built first), GB/s of
weights + scales + biases read, and that as a fraction of MLX's copy bandwidth (bytes read +
written) measured in the same process. Each timing rotates over enough copies of the layer
(> 200 MB) that the weights do not sit in the GPU's L2 cache. On CUDA with torch, also the
kernels' own GPU µs per call (CUPTI), which leave MLX's host launch cost out. Needs a Metal
or CUDA GPU.

    python benchmarks/gemv.py [--tokens 1,2] [--configs "wp=2;nw=8,rpw=2"] [--json out.json]
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxkt.kernels import qgemv  # noqa: E402
from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance  # noqa: E402
from mlxkt.kernels.probe import relative_error  # noqa: E402
from mlxkt.kernels.selftest import median_time  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_profile import gpu_us  # noqa: E402

SHAPES = {  # name: (out, in), DeepSeek-V3
    "q_a_proj": (1536, 7168), "kv_a_proj": (576, 7168), "q_b_proj": (24576, 1536),
    "q_kv_a_proj": (2112, 7168),  # q_a_proj and kv_a_proj_with_mqa as one (fused-proj)
    "o_proj": (7168, 16384), "shared_gate": (2048, 7168), "shared_down": (7168, 2048),
    "lm_head": (129280, 7168),
}


def layer_bytes(m):
    return m.weight.nbytes + m.scales.nbytes + m.biases.nbytes


def host_us(fn, ins, reps=5):
    """Host µs per call: building the lazy graph, and MLX encoding it (async_eval returning)."""
    import time

    build, encode = [], []
    for _ in range(reps):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [fn(*a) for a in ins]
        t1 = time.perf_counter()
        mx.async_eval(outs)
        t2 = time.perf_counter()
        mx.eval(outs)
        build.append((t1 - t0) / len(ins))
        encode.append((t2 - t1) / len(ins))
    return {"build_us": 1e6 * sorted(build)[reps // 2], "async_eval_us": 1e6 * sorted(encode)[reps // 2]}


def copy_bandwidth() -> float:
    """Bytes read + written per second by `-x` over 1 GiB of float32 (printed too)."""
    x0 = mx.random.uniform(shape=(2**28,))
    mx.eval(x0)
    copy = 2 * x0.nbytes / median_time(lambda v: -v, [(x0,)], iters=10)
    print(f"copy bandwidth {copy / 1e9:.1f} GB/s")
    return copy


def setup(doc, shapes):
    """(arguments, GPU backend, copy bandwidth) of a GEMV benchmark; exits without a GPU."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--tokens", default="1,2")
    ap.add_argument("--shapes", default=",".join(shapes))
    ap.add_argument("--configs", default="", help="extra launch configs, ';'-separated")
    ap.add_argument("--json")
    a = ap.parse_args()
    backend = gpu_backend()
    if backend is None:
        sys.exit("needs a Metal or CUDA GPU (MLX's default device is the CPU)")
    return a, backend, copy_bandwidth()


def parse_configs(text):
    out = [{}]
    for part in filter(None, (text or "").split(";")):
        out.append({k: int(v) for k, v in (kv.split("=") for kv in part.split(","))})
    return out


def main():
    a, backend, copy = setup(__doc__, SHAPES)
    rows = []
    for name in a.shapes.split(","):
        O, D = SHAPES[name]
        first = qgemv.random_linear(O, D, 4, 64, mx.bfloat16, seed=0)
        copies = max(1, min(16, int(2e8 // layer_bytes(first)) + 1))
        layers = [first] + [qgemv.random_linear(O, D, 4, 64, mx.bfloat16, seed=i)
                            for i in range(1, copies)]
        nbytes = layer_bytes(first)
        for N in map(int, a.tokens.split(",")):
            x = mx.random.normal((N, D)).astype(mx.bfloat16)
            ins = [(m,) for m in layers]
            ref = lambda m: qgemv.reference(x, m)  # noqa: E731
            t_ref = median_time(ref, ins, iters=len(ins) * 2, prebuilt=True)
            row = {"shape": name, "out": O, "in": D, "tokens": N, "mb": nbytes / 1e6,
                   "mlx_us": t_ref * 1e6, "mlx_copy_frac": nbytes / t_ref / copy,
                   "mlx_gpu_us": gpu_us(ref, ins, len(ins) * 4),
                   "mlx_host": host_us(ref, ins * 4),
                   "kernel_host": host_us(lambda m: qgemv.quantized_gemv(x, m, backend), ins * 4)}
            for cfg in parse_configs(a.configs):
                key = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
                try:
                    y = qgemv.quantized_gemv(x, first, backend, **cfg)
                    err = relative_error(y, qgemv.reference(x.astype(mx.float32), qgemv._float32_copy(first)))
                    fn = lambda m, c=cfg: qgemv.quantized_gemv(x, m, backend, **c)  # noqa: E731
                    t = median_time(fn, ins, iters=len(ins) * 2, prebuilt=True)
                    g_us = gpu_us(fn, ins, len(ins) * 4)
                except Exception as e:  # a config that does not build
                    row[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    continue
                row[key] = {"us": t * 1e6, "copy_frac": nbytes / t / copy, "speedup": t_ref / t,
                            "rel_error": err, "ok": err < probe_tolerance(mx.bfloat16),
                            "gpu_us": g_us, "gpu_copy_frac": g_us and nbytes / (g_us * 1e-6) / copy,
                            "config": qgemv.launch_config(O, D, 4, 64, N, **cfg)}
            rows.append(row)
            best = min((v for k, v in row.items() if isinstance(v, dict) and "us" in v),
                       key=lambda v: v["us"], default=None)
            g = lambda v: "" if v is None else f", GPU {v:.1f}"  # noqa: E731
            print(f"{name:12s} {O:6d}x{D:<5d} N={N} {nbytes / 1e6:7.1f} MB  mlx {t_ref * 1e6:7.1f} us "
                  f"({row['mlx_copy_frac']:.0%}{g(row['mlx_gpu_us'])})  " + "  ".join(
                      f"{k}: {v['us']:.1f} us ({v['copy_frac']:.0%}, {v['speedup']:.2f}x"
                      f"{g(v['gpu_us'])}{'' if v['ok'] else ' BAD'})"
                      for k, v in row.items() if isinstance(v, dict) and "us" in v)
                  + (f"  best {best['config']}" if best else ""))
            print(f"{'':12s} host µs per call, build / async_eval: mlx {row['mlx_host']['build_us']:.1f} / "
                  f"{row['mlx_host']['async_eval_us']:.1f}, kernel {row['kernel_host']['build_us']:.1f} / "
                  f"{row['kernel_host']['async_eval_us']:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"copy_gbps": copy / 1e9, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
