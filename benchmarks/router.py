"""The DeepSeek router after the logits matmul: the fused kernel vs the plain-MLX ops.

Prints a table and JSON: µs per call for the routing alone (logits -> inds, weights) and for
the whole gate (bf16 x @ W.T, float32 logits, then the routing), at DeepSeek-V3's shape
(E 256, 8 groups, 4 kept, top-8; D 7168) by default. Two timings per row: `call` includes
building MLX's lazy graph in Python (what a caller pays per call), `eval` starts the clock
once the graphs are built (GPU work and launches only); each is the median of several
batches of queued calls. Needs a Metal or CUDA GPU.

    python benchmarks/router.py [--tokens 1,2,8] [--configs v3,v2,v2-lite] [--json out.json]
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxkt.kernels.dispatch import gpu_backend  # noqa: E402
from mlxkt.kernels.router import CONFIGS as GATES  # noqa: E402
from mlxkt.kernels.router import fused_route, random_inputs, route_error  # noqa: E402
from mlxkt.kernels.selftest import median_time  # noqa: E402
from mlxkt.layers.moe import route_reference  # noqa: E402

CONFIGS = {"v3": GATES["deepseek-v3"], "v2": GATES["deepseek-v2"],
           "v2-lite": GATES["deepseek-v2-lite"]}
HIDDEN = {"v3": 7168, "v2": 5120, "v2-lite": 2048}
SETS = 16  # distinct inputs, rotated through the timed calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,8")
    ap.add_argument("--configs", default="v3")
    ap.add_argument("--iters", type=int, default=50, help="calls per timing batch")
    ap.add_argument("--reps", type=int, default=9, help="timing batches (median)")
    ap.add_argument("--json")
    args = ap.parse_args()
    backend = gpu_backend()
    if backend is None:
        sys.exit("benchmarks/router.py needs a Metal or CUDA GPU (MLX's default device is "
                 f"{mx.default_device()}): nothing to time here")
    print(f"device {mx.device_info().get('device_name', '?')}, backend {backend}, "
          f"mlx {mx.__version__}")
    rows = []

    def timed(name, what, n, fn, sets, **extra):
        call = median_time(fn, sets, iters=args.iters, reps=args.reps)
        ev = median_time(fn, sets, iters=args.iters, reps=args.reps, prebuilt=True)
        rows.append({"config": name, "what": what, "tokens": n, "call_us": call * 1e6,
                     "eval_us": ev * 1e6, **extra})

    for name in args.configs.split(","):
        cfg, D = CONFIGS[name], HIDDEN[name]
        bias = random_inputs(cfg, 1)[1] if cfg.biased else None
        w = (mx.random.normal((cfg.n_experts, D)) / D**0.5).astype(mx.bfloat16)

        def fused(lg):
            return fused_route(lg, bias, cfg, backend)

        def reference(lg):
            return route_reference(lg, bias, cfg)

        def gate(route_fn):
            return lambda x: route_fn((x @ w.T).astype(mx.float32))

        for n in [int(t) for t in args.tokens.split(",")]:
            logits = [(random_inputs(cfg, n, seed=s)[0],) for s in range(SETS)]
            xs = [(mx.random.normal((n, D), key=mx.random.key(s)).astype(mx.bfloat16),)
                  for s in range(SETS)]
            err = max(route_error(*fused(lg), *reference(lg)) for (lg,) in logits)
            timed(name, "route fused", n, fused, logits, route_error=err)
            timed(name, "route reference", n, reference, logits)
            timed(name, "gate fused", n, gate(fused), xs)
            timed(name, "gate reference", n, gate(reference), xs)
            mx.clear_cache()

    print(f"\n{'config':8} {'what':16} {'tok':>3} {'eval us':>8} {'call us':>8} {'speedup':>8}")
    base = {(r["config"], r["what"].split()[0], r["tokens"]): r for r in rows
            if r["what"].endswith("reference")}
    for r in rows:
        ref = base[(r["config"], r["what"].split()[0], r["tokens"])]
        r["eval_speedup"] = ref["eval_us"] / r["eval_us"]
        r["call_speedup"] = ref["call_us"] / r["call_us"]
        print(f"{r['config']:8} {r['what']:16} {r['tokens']:>3} {r['eval_us']:8.1f} "
              f"{r['call_us']:8.1f} {r['eval_speedup']:7.2f}x"
              + (f"  (route error {r['route_error']:.1e})" if "route_error" in r else ""))
    out = {"device": mx.device_info().get("device_name"), "backend": backend,
           "mlx": mx.__version__, "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
