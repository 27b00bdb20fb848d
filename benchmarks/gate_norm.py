"""A MoE layer's post-attention RMSNorm + router logits: the gate_norm kernel (one launch) vs
MLX's RMSNorm and bf16 matmul (two), eval-only µs per call (median of batches of queued
calls, GPU work and launches only), over launch configs. Needs a Metal or CUDA GPU.

    python benchmarks/gate_norm.py [--experts 32,256] [--configs 4x1,8x1,4x2] [--json out.json]

A config is WARPSxROWS (warps per block x experts per block).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxkt.kernels import gate_norm  # noqa: E402
from mlxkt.kernels.dispatch import gpu_backend  # noqa: E402
from mlxkt.kernels.selftest import median_time  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", default="32,256", help="32: the bench slice; 256: DeepSeek-V3")
    ap.add_argument("--dims", type=int, default=7168)
    ap.add_argument("--configs", default="4x1,4x2,8x1,8x2,2x1,16x1,4x4")
    ap.add_argument("--json")
    a = ap.parse_args()
    backend = gpu_backend()
    if backend is None:
        sys.exit("needs a Metal or CUDA GPU")
    D, rows = a.dims, []
    for E in map(int, a.experts.split(",")):
        h = mx.random.normal((1, 1, D)).astype(mx.bfloat16)
        ws = [(mx.random.normal((E, D)) / math.sqrt(D)).astype(mx.bfloat16) for _ in range(4)]
        norm = nn.RMSNorm(D)
        norm.weight = (1 + 0.3 * mx.random.normal((D,))).astype(mx.bfloat16)
        mx.eval(h, ws, norm.weight)
        ins = [(w,) for w in ws]
        mlx_us = 1e6 * median_time(lambda w: (lambda xn: (xn @ w.T, xn))(norm(h)), ins,
                                   prebuilt=True)
        for cfg in a.configs.split(","):
            warps, per_block = map(int, cfg.split("x"))
            us = 1e6 * median_time(lambda w: gate_norm.gate_norm(
                h, w, norm, backend, warps=warps, rows=per_block), ins, prebuilt=True)
            rows.append({"experts": E, "config": cfg, "kernel_us": us, "mlx_us": mlx_us})
            print(f"E {E:4}  {cfg:>5}  kernel {us:6.1f} us   MLX RMSNorm + matmul {mlx_us:6.1f} us")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
