"""A MoE layer's post-attention RMSNorm and its router logits in one kernel (decode; off
unless MLXKT_GATE_NORM=1, see backend_for).

At decode the norm (`rms_norm`) and the router's dense matmul (MLX's `gemv_single`) were two
small launches per MoE layer, each waiting mostly on memory latency (4.8 and 8 µs of GPU
time per call on an H200, bench slice), and each one more kernel for MLX's host to launch.
metal/gate_norm.inc computes both from the residual stream h: the logits (float32) and the
normalised input the experts read. The reference is `reference()`; what the layer computed
before is `gate(norm(h))`.
"""

import math
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..device import env_switch
from . import sources
from .dispatch import checked, gpu_backend, kernels_enabled, probe_tolerance
from .moe import FLOAT_TYPES, MAX_TOKENS, TYPE_KIND, float_bits, kernel_fn

GATE_NORM = sources.KernelSpec(
    name="mlxkt_gate_norm",
    body="gate_norm.inc",
    inputs=("h", "w", "g"),
    outputs=("logits", "xn"),
    raw16=(("TK", "h"), ("WK", "w"), ("GK", "g")),
)

ENV = "MLXKT_GATE_NORM"  # 1: on (any GPU); unset or 0: off (see backend_for)
WARPS, ROWS = 4, 1  # per block: a block per expert (benchmarks: E 32 and 256 alike)


def backend_for(forced: Optional[bool] = None) -> Optional[str]:
    """The GPU backend that should run the kernel, or None (forced: a layer's switch). Off
    unless asked for (MLXKT_GATE_NORM=1, the bench variant gate-norm): on an H200 it cut a
    decode step's kernels 158 -> 150 and its GPU busy time by 2%, but decoded at 0.95x
    (1K) and 0.97x (8K) of the engine without it, within that run's noise
    (benchmarks/RESULTS.md); no Mac has timed it."""
    on = env_switch(ENV) if forced is None else forced
    return gpu_backend() if on and kernels_enabled() else None


def unsupported(h, weight, norm) -> str:
    """Why the kernel cannot take this call ("" when it can)."""
    if type(norm) is not nn.RMSNorm or norm.weight.dtype not in FLOAT_TYPES:
        return "not a plain RMSNorm"
    if h.dtype not in FLOAT_TYPES or weight.dtype not in FLOAT_TYPES or weight.ndim != 2:
        return "types"
    D = h.shape[-1]
    if D % 4 or weight.shape[1] != D or norm.weight.shape != (D,):
        return "widths"
    if h.size // D > MAX_TOKENS:
        return "more tokens than a decode step"
    return ""


@lru_cache(maxsize=64)
def launch(E, D, lead, dtype, wdtype, gdtype, eps, warps=WARPS, rows=ROWS):
    N = math.prod(lead)
    return dict(
        template=[("E", E), ("D", D), ("NT", N), ("NW", warps), ("RPB", rows),
                  ("TK", TYPE_KIND[dtype]), ("WK", TYPE_KIND[wdtype]),
                  ("GK", TYPE_KIND[gdtype]), ("T", dtype), ("EPS", float_bits(eps))],
        grid=(math.ceil(E / rows) * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(*lead, E), (*lead, D)],
        output_dtypes=[mx.float32, dtype],
    )


def gate_norm(h, weight, norm, backend, **config):
    """(h_n @ weight.T in float32, h_n) for h_n = norm(h), one launch (config: warps, rows
    per block)."""
    # h: [..., D], weight: [E, D] -> logits [..., E] float32, xn [..., D] (h.dtype)
    kw = launch(weight.shape[0], h.shape[-1], h.shape[:-1], h.dtype, weight.dtype,
                norm.weight.dtype, float(norm.eps), **config)
    return tuple(kernel_fn(backend, GATE_NORM)(inputs=[h, weight, norm.weight], **kw))


def reference(h, weight, norm):
    """The same in MLX ops, in float32 on the CPU (MLX's CUDA float32 matmul is TF32)."""
    with mx.stream(mx.cpu):
        xn = norm(h.astype(mx.float32))
        return xn @ weight.astype(mx.float32).T, xn


@lru_cache(maxsize=None)
def ready(backend: str, signature) -> bool:
    return checked(f"{backend} router-norm", lambda: probe(backend, signature),
                   probe_tolerance(signature[3]))


def normed_logits(h, weight, norm, forced: Optional[bool] = None):
    """(logits, norm(h)) by the kernel where it runs and takes this call, else None."""
    backend = backend_for(forced)
    if backend is None or unsupported(h, weight, norm):
        return None
    sig = (weight.shape[0], h.shape[-1], h.size // h.shape[-1], h.dtype, weight.dtype,
           norm.weight.dtype, float(norm.eps))
    if not ready(backend, sig):
        return None
    return gate_norm(h, weight, norm, backend)


def probe(backend, signature) -> float:
    """Largest relative error of both outputs against the float32 reference on random data.
    signature: (E, D, N, dtype, weight dtype, g dtype, eps)."""
    from .probe import relative_error

    E, D, N, dtype, wdtype, gdtype, eps = signature
    k = mx.random.split(mx.random.key(5), 3)
    h = (4 * mx.random.normal((N, D), key=k[0])).astype(dtype)
    w = (mx.random.normal((E, D), key=k[1]) / math.sqrt(D)).astype(wdtype)
    norm = nn.RMSNorm(D, eps=eps)
    norm.weight = (1 + 0.3 * mx.random.normal((D,), key=k[2])).astype(gdtype)
    got = gate_norm(h, w, norm, backend)
    norm32 = nn.RMSNorm(D, eps=eps)
    norm32.weight = norm.weight.astype(mx.float32)
    want = reference(h, w, norm32)
    return max(relative_error(a, b) for a, b in zip(got, want))


def selftest(backend: str, echo=print, tokens=(1, 2), experts=256, dims=7168):
    """The kernel against the float32 reference and MLX's two ops (RMSNorm, bf16 matmul) at
    DeepSeek-V3's widths, for `mlxkt selftest`: on a Mac, whether MLXKT_GATE_NORM=1 is
    right and pays."""
    from .probe import relative_error
    from .selftest import median_time, timed_row  # selftest imports this module

    E, D = experts, dims
    rows = []
    echo(f"{'router norm + logits':22} {'tok':>3} {'status':>6} {'rel err':>9} "
         f"{'kernel us':>9} {'mlx us':>9}")
    for n in tokens:
        def measure():
            k = mx.random.split(mx.random.key(n), 3)
            h = (4 * mx.random.normal((1, n, D), key=k[0])).astype(mx.bfloat16)
            ws = [(mx.random.normal((E, D), key=mx.random.key(10 + i)) / math.sqrt(D))
                  .astype(mx.bfloat16) for i in range(4)]
            norm = nn.RMSNorm(D, eps=1e-6)
            norm.weight = (1 + 0.3 * mx.random.normal((D,), key=k[2])).astype(mx.bfloat16)
            norm32 = nn.RMSNorm(D, eps=1e-6)
            norm32.weight = norm.weight.astype(mx.float32)
            got = gate_norm(h, ws[0], norm, backend)
            err = max(relative_error(a, b) for a, b in zip(got, reference(h, ws[0], norm32)))
            ins = [(w,) for w in ws]
            mx.eval(ins)
            k_s = median_time(lambda w: gate_norm(h, w, norm, backend), ins)
            m_s = median_time(lambda w: (lambda xn: (xn @ w.T, xn))(norm(h)), ins)
            return err, k_s, m_s

        rows.append(timed_row({"kernel": "gate-norm", "tokens": n}, "deepseek-v3", n, measure,
                              probe_tolerance(mx.bfloat16), echo))
    return rows
