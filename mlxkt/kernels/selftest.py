"""Each available kernel against the reference at DeepSeek-V3 and Mixtral shapes.

Prints pass/fail, the error and the speed of fused vs reference. On a machine without a
supported GPU it says so: only the reference runs there.
"""

import time

import mlx.core as mx
import numpy as np

from .dispatch import gpu_backend, kernels_enabled, probe_tolerance
from .moe import decode_sized, fused_routed_experts, unsupported
from .probe import (random_problem, random_shared_expert, reference_float32, relative_error,
                    shared_reference)
from .reference import routed_experts_reference
from .gate_norm import selftest as gate_norm_selftest
from .mla_decode import selftest as mla_selftest
from .mla_prep import selftest as prep_selftest
from .mla_queries import selftest as queries_selftest
from .qgemv import selftest as gemv_selftest
from .qgemv_lanes import selftest as lanes_selftest
from .router import selftest as router_selftest

SHAPES = {
    # name: (hidden D, expert intermediate I, experts E, top-k K)
    "deepseek-v3": (7168, 2048, 256, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}


def median_time(fn, inputs, iters=20, reps=5, prebuilt=False):
    """Median seconds per call over `reps` batches of `iters` queued calls (inputs rotate).

    prebuilt=False times building the lazy graphs too (what a Python caller pays per call);
    prebuilt=True starts the clock after building them (GPU work and launches only).
    """
    mx.eval([fn(*inputs[i % len(inputs)]) for i in range(3)])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*inputs[i % len(inputs)]) for i in range(iters)]
        if prebuilt:
            t0 = time.perf_counter()
        mx.eval(outs)
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def timed_row(row, label, size, measure, tolerance, echo, us_keys=("kernel_us", "reference_us"),
              widths=(22, 3)):
    """Fill `row` from measure() -> (error, kernel s, reference s) and print it as one line
    of a kernel's selftest table; a build or launch failure becomes a FAIL row, and the
    selftest goes on."""
    lw, sw = widths
    try:
        err, k_s, r_s = measure()
        row.update(status="pass" if err < tolerance else "FAIL", error=err,
                   **{us_keys[0]: k_s * 1e6, us_keys[1]: r_s * 1e6})
        echo(f"{label:{lw}} {size:>{sw}} {row['status']:>6} {err:9.2e} {k_s * 1e6:9.1f} "
             f"{r_s * 1e6:9.1f}")
    except Exception as e:  # a build or launch failure: report it, go on
        row.update(status="FAIL", why=f"{type(e).__name__}: {e}")
        echo(f"{label:{lw}} {size:>{sw}}   FAIL  {row['why']}")
    return row


def routings(E, N, K, count, seed=1):
    """`count` random routings (distinct experts per token) so timings do not sit in cache."""
    rng = np.random.default_rng(seed)
    inds = [np.stack([rng.choice(E, K, replace=False) for _ in range(N)]) for _ in range(count)]
    scores = [rng.uniform(0.1, 1.0, (N, K)).astype(np.float32) for _ in range(count)]
    return [(mx.array(i.astype(np.uint32)), mx.array(s)) for i, s in zip(inds, scores)]


def run_case(backend, name, bits, N, experts=None, dtype=mx.bfloat16, shared=False):
    """One shape; with shared, plus a shared expert of one routed expert's shape (DeepSeek-V3),
    inside the kernels' launches against the reference + the shared MLP's own linears."""
    D, I, E, K = SHAPES[name]
    E = experts or E
    x, inds, scores, gate, up, down = random_problem(
        D, I, N, K, E, bits=(bits, bits), group_size=(64, 64), dtype=dtype, repeat=False)
    row = {"shape": name + ("+shared" if shared else ""), "bits": bits, "tokens": N,
           "experts": E, "top_k": K}
    sh = random_shared_expert(gate, up, down) if shared else None

    def fused(a, b, c):
        return fused_routed_experts(a, b, c, gate, up, down, backend, sh)

    def native_path(a, b, c):
        y = routed_experts_reference(a, b, c, gate, up, down)
        return y if sh is None else y + sh(a)

    why = unsupported(x, inds, gate, up, down) or (
        None if decode_sized(x, inds) else "beyond the decode kernels' 8 tokens / 64 pairs")
    if why:
        return {**row, "status": "skip", "why": why}
    try:
        y = fused(x, inds, scores)
        native = native_path(x, inds, scores)
        ref = reference_float32(x, inds, scores, gate, up, down)  # upcast inputs
        if sh is not None:
            ref = ref + shared_reference(x, sh, float32=True)
        mx.eval(y, native, ref)
    except Exception as e:
        return {**row, "status": "FAIL", "why": f"{type(e).__name__}: {e}"}
    err = relative_error(y, ref)
    diff = np.abs(np.array(y.astype(mx.float32)) - np.array(ref))
    row.update(rel_error=err, max_abs_error=float(diff.max()),
               max_abs_ref=float(np.abs(np.array(ref)).max()),
               reference_rel_error=relative_error(native, ref),
               status="pass" if err < probe_tolerance(dtype) else "FAIL")
    sets = [(x, i, s) for i, s in routings(E, N, K, 8)]
    fused_s = median_time(fused, sets)
    ref_s = median_time(native_path, sets)
    row.update(fused_us=fused_s * 1e6, reference_us=ref_s * 1e6, speedup=ref_s / fused_s)
    return row


def selftest(shapes=None, bits=(4, 8), tokens=(1, 4), experts=None, echo=print):
    backend = gpu_backend()
    echo(f"mlx {mx.__version__}, device {mx.default_device()}, kernel backend: {backend or 'none'}"
         + ("" if kernels_enabled() else " (MLXKT_KERNELS=0: the models use the reference)"))
    if backend is None:
        echo("No Metal or CUDA GPU here: the routed experts run as plain MLX ops; "
             "nothing to test.")
        return []
    rows = []
    echo("errors are relative to the reference on float32-upcast inputs; 'ref err' is the "
         "reference's own, in the model's dtype")
    echo(f"{'shape':18} {'bits':>4} {'tok':>3} {'status':>6} {'rel err':>9} {'max err':>9} "
         f"{'ref err':>9} {'fused us':>9} {'ref us':>9} {'speedup':>7}")
    cases = [(name, False) for name in shapes or SHAPES]
    if "deepseek-v3" in (shapes or SHAPES):
        cases.append(("deepseek-v3", True))
    for name, shared in cases:
        for b in bits:
            for n in tokens:
                r = run_case(backend, name, b, n, experts, shared=shared)
                rows.append(r)
                label = r["shape"]
                if r["status"] in ("pass", "FAIL") and "fused_us" in r:
                    echo(f"{label:18} {b:>4} {n:>3} {r['status']:>6} {r['rel_error']:9.2e} "
                         f"{r['max_abs_error']:9.2e} {r['reference_rel_error']:9.2e} "
                         f"{r['fused_us']:9.1f} "
                         f"{r['reference_us']:9.1f} {r['speedup']:6.2f}x")
                else:
                    echo(f"{label:18} {b:>4} {n:>3} {r['status']:>6}  {r.get('why', '')}")
                mx.clear_cache()
    rows += router_selftest(backend, echo)
    rows += gemv_selftest(backend, echo)
    rows += lanes_selftest(backend, echo)
    rows += prep_selftest(backend, echo)
    rows += queries_selftest(backend, echo)
    rows += gate_norm_selftest(backend, echo)
    rows += mla_selftest(backend, echo)
    return rows
