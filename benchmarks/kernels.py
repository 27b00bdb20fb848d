"""One DeepSeek-V3 MoE layer's routed experts: fused kernels vs the plain-MLX reference.

Prints a table and JSON: µs per call, GB/s of expert weights read (each selected expert's
gate/up/down weights, scales and biases once) and that as a fraction of the copy bandwidth
MLX reaches on this GPU (measured here, bytes read + written). Needs a Metal or CUDA GPU.
Two timings per row: `call` includes building MLX's lazy graph in Python (what a caller pays
per call), `eval` starts the clock once the graphs are built (GPU work and launches); GB/s,
the fraction of copy bandwidth and the speed-up use `eval`.

    python benchmarks/kernels.py [--tokens 1,2,4,8] [--bits 4,8] [--json out.json]
    python benchmarks/kernels.py --sweep [--bits 4] [--json sweep.json]

--sweep times launch variants instead (moe.launch_config's keys; eval-only timing): stage 1
alone for each stage-1 variant and the whole call for each stage-2 variant at 1 token, then
the best of each combined, and the best few at 2 and 8 tokens. A variant that fails to build
or to match the reference is marked FAIL and the sweep goes on.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance  # noqa: E402
from mlxkt.kernels.moe import fused_routed_experts, fused_stages, launch_config  # noqa: E402
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

# --sweep: moe.launch_config keys. Stage-1 keys: nw[0], rt, rw, sa, xc; stage-2 keys: nw[1], rb,
# sb, ue, dq, xs. Defaults (moe.py) at 4 bits: nw (4, 4), rt 1 at 1 token, rw 2, sa 4, rb 8, sb 1,
# ue 1, dq 1; at 8 bits rw 1, rb 2, dq 0 (variants equal to the defaults there are skipped).
STAGE1 = [{}, {"rw": 1}, {"rw": 1, "rt": 8}, {"rt": 2}, {"rt": 4}, {"nw": (8, 4)},
          {"nw": (8, 4), "rt": 2}, {"sa": 2}, {"sa": 7}, {"rw": 4}, {"xc": 1}]
STAGE2 = [{}, {"rb": 4}, {"rb": 4, "nw": (4, 8)}, {"nw": (4, 8)}, {"rb": 2},
          {"rb": 2, "dq": 0}, {"dq": 0}, {"ue": 2}, {"sb": 2},
          {"xs": 1}, {"xs": 1, "nw": (4, 2)}, {"xs": 1, "nw": (4, 8)}, {"xs": 1, "rb": 4},
          {"xs": 1, "rb": 4, "nw": (4, 8)}, {"xs": 1, "rb": 16, "nw": (4, 2)},
          {"xs": 1, "rb": 4, "sb": 2}]
ROUNDS = 3  # every variant timed once per round, rounds interleaved: drifts hit all alike


def merge(a, b):
    """Stage-1 keys of a with stage-2 keys of b (nw is a (stage 1, stage 2) pair)."""
    out = {k: v for k, v in a.items() if k in ("rt", "rw", "sa")}
    out.update({k: v for k, v in b.items() if k in ("rb", "sb", "ue", "dq", "xs")})
    na, nb = a.get("nw", (4, 4)), b.get("nw", (4, 4))
    if (na[0], nb[1]) != (4, 4):
        out["nw"] = (na[0], nb[1])
    return out


def distinct(configs, bits):
    """The configs that launch differently at these bits (the defaults depend on them)."""
    seen, out = [], []
    for c in configs:
        launch = launch_config(D, I, bits, bits, pairs=K, **c)
        if launch not in seen:
            seen.append(launch)
            out.append(c)
    return out


def fastest(rows):
    return sorted((r for r in rows if r["status"] == "pass"), key=lambda r: r["us"])


def uniq(sets):
    return float(np.mean([len(np.unique(np.array(i))) for _, i, _ in sets]))


def measure(cases, refs, copy_bw, iters):
    """cases: (row, fn, sets, moved bytes, check fn). Checks each (builds its kernels), then
    times the passing ones in ROUNDS interleaved rounds; fills and returns the rows."""
    t0 = time.perf_counter()
    for row, fn, sets, moved, check in cases:
        try:
            err = relative_error(check(), refs[row["tokens"]])
            row.update(rel_error=err,
                       status="pass" if err < probe_tolerance(mx.bfloat16) else "FAIL")
        except Exception as e:  # a variant that fails to build or launch: note it, go on
            row.update(status="FAIL", why=f"{type(e).__name__}: {e}"[:300])
        row.update(us=float("inf"), rounds_us=[])
    live = [c for c in cases if c[0]["status"] == "pass"]
    t1 = time.perf_counter()
    for _ in range(ROUNDS):
        for row, fn, sets, moved, _ in live:
            try:
                row["rounds_us"].append(median_time(fn, sets, iters=iters, reps=5,
                                                    prebuilt=True) * 1e6)
            except Exception as e:
                row.update(status="FAIL", why=f"{type(e).__name__}: {e}"[:300])
    print(f"  {len(cases)} variants: {t1 - t0:.0f} s to build and check, "
          f"{time.perf_counter() - t1:.0f} s to time", flush=True)
    for row, fn, sets, moved, _ in cases:
        if row["status"] == "pass" and row["rounds_us"]:
            us = float(np.median(row["rounds_us"]))
            row.update(us=us, spread=(max(row["rounds_us"]) - min(row["rounds_us"])) / us,
                       gb_s=moved / us / 1e3, of_copy=moved / us * 1e6 / copy_bw)
        print(f"  {row['part']:8} {row['bits']}b {row['tokens']}t {row['status']:4} "
              f"{row['us']:8.1f} us  {row['config']} {row.get('why', '')}", flush=True)
    return [c[0] for c in cases]


def sweep(backend, copy_bw, bits_list, iters):
    rows = []
    for bits in bits_list:
        _, _, _, *layers = random_problem(D, I, 1, K, E, bits=(bits, bits), dtype=mx.bfloat16,
                                          repeat=False)
        sets_n = {n: [(mx.random.normal((n, D)).astype(mx.bfloat16), i, s)
                      for i, s in routings(E, n, K, 16, seed=n)] for n in (1, 2, 8)}
        refs = {n: reference_float32(*sets_n[n][0], *layers) for n in sets_n}
        mx.eval(refs)

        def case(part, n, cfg, stage1_only=False):
            sets = sets_n[n]

            def fn(a, b, c):
                if stage1_only:  # h alone: MLX runs stage 1 only
                    return fused_stages(a, b, c, *layers, backend, **cfg)[0][0]
                return fused_routed_experts(a, b, c, *layers, backend, **cfg)

            moved = uniq(sets) * expert_bytes(*(layers[:2] if stage1_only else layers))
            row = {"part": part, "bits": bits, "tokens": n, "config": cfg, "status": "?"}
            # the check: the whole call (stage 1 variants with stage 2's defaults)
            check = lambda: fused_routed_experts(*sets[0], *layers, backend, **cfg)  # noqa: E731
            return row, fn, sets, moved, check

        for n in sets_n:
            sets = sets_n[n]
            ref = median_time(lambda a, b, c: routed_experts_reference(a, b, c, *layers),
                              sets, iters=iters, reps=5, prebuilt=True)
            moved = uniq(sets) * expert_bytes(*layers)
            rows.append({"part": "ref", "bits": bits, "tokens": n, "config": "reference",
                         "us": ref * 1e6, "gb_s": moved / ref / 1e9,
                         "of_copy": moved / ref / copy_bw, "status": "pass"})
        s1 = measure([case("stage1", 1, c, True) for c in distinct(STAGE1, bits)], refs,
                     copy_bw, iters)
        s2 = measure([case("stage2", 1, c) for c in distinct(STAGE2, bits)], refs, copy_bw,
                     iters)
        combos = []
        for a in [r["config"] for r in fastest(s1)[:2]] or [{}]:
            for b in [r["config"] for r in fastest(s2)[:2]] or [{}]:
                combos.append(merge(a, b))
        combos = distinct(combos, bits)
        comb = measure([case("combined", 1, c) for c in combos], refs, copy_bw, iters)
        finalists = [{}] + [r["config"] for r in fastest(comb)[:2] if r["config"]]
        more = measure([case("combined", n, c) for n in (2, 8) for c in finalists],
                       refs, copy_bw, iters)
        rows += s1 + s2 + comb + more
        mx.clear_cache()
    print("\nstage1: h alone; stage2: the whole call, stage 2 varied; combined: the whole call. "
          f"eval-only µs, median of {ROUNDS} interleaved rounds (spread: (max - min) / median)")
    print(f"{'part':8} {'bits':>4} {'tok':>3} {'eval us':>8} {'spread':>6} {'GB/s':>6} "
          f"{'of copy':>7} {'rel err':>8} {'status':>6}  config")
    for r in sorted(rows, key=lambda r: (r["bits"], r["tokens"], r["part"] != "ref", r["us"])):
        nums = (f"{r['us']:8.1f} {r.get('spread', 0):6.0%} {r['gb_s']:6.0f} {r['of_copy']:7.0%}"
                if r["us"] != float("inf") else f"{'-':>8} {'-':>6} {'-':>6} {'-':>7}")
        print(f"{r['part']:8} {r['bits']:>4} {r['tokens']:>3} {nums} "
              f"{r.get('rel_error', float('nan')):8.1e} {r['status']:>6}  {r['config']} "
              f"{r.get('why', '')}")
    return {"device": mx.device_info().get("device_name"), "backend": backend,
            "mlx": mx.__version__, "copy_gb_s": copy_bw / 1e9, "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--sweep", action="store_true", help="time launch variants instead")
    ap.add_argument("--iters", type=int, default=40, help="--sweep: calls per timing batch")
    ap.add_argument("--json")
    args = ap.parse_args()
    backend = gpu_backend()
    if backend is None:
        sys.exit("benchmarks/kernels.py needs a Metal or CUDA GPU")
    copy_bw = copy_bandwidth()
    print(f"device {mx.device_info().get('device_name', '?')}, backend {backend}, "
          f"MLX copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    if args.sweep:
        out = sweep(backend, copy_bw, [int(b) for b in args.bits.split(",")], args.iters)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return
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
            timed("fused", bits, n,
                  lambda a, b, c: fused_routed_experts(a, b, c, gate, up, down, backend),
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
        fused = r["what"] == "fused"
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
