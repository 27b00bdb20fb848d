"""MLA decode prologue: one kernel for what follows the q and kv_a projections.

After the projections a decode step needs the no-rope queries as a contiguous array (for
embed_q), the roped and scaled rope queries, the RMS-normalised latent and the roped shared
key. In MLX ops that is an RMS norm, two ropes (each with a copy of its strided slice), a
copy and a multiply: five to seven launches per layer, each with MLX's host cost of several
µs. metal/mla_prep.inc does it in one. The reference is `reference()` (MLX ops, what
MLAttention.split_rope computes).
"""

from functools import lru_cache
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..device import env_switch
from . import sources
from .moe import FLOAT_TYPES, float_bits, kernel_fn

PREP = sources.KernelSpec(
    name="mlxkt_mla_prep",
    body="mla_prep.inc",
    inputs=("q", "kv", "g", "pos", "inv"),
    outputs=("qn", "qp", "lat", "kp"),
)

ENV = "MLXKT_MLA_PREP"  # 1/0: force the kernel on (any GPU) or off
MAX_ROWS = 16  # query rows per call (decode, MTP verification)
WARPS = 2


def enabled(backend: Optional[str]) -> bool:
    """MLXKT_MLA_PREP=1/0, else on CUDA only (measured there; Apple GPUs run decode eagerly
    and nobody has timed the kernel on one)."""
    forced = env_switch(ENV)
    return backend == "cuda" if forced is None else bool(forced) and backend is not None


@dataclass(frozen=True)
class Rope:
    """The numbers of a rope module that the kernel reproduces."""
    inv: mx.array  # [P/2] float32: 1 / period of each pair
    traditional: bool
    scale: float  # positions are multiplied by it
    mscale: float  # inputs are multiplied by it (YaRN)


def rope_table(rope: nn.Module, dims: int) -> Optional[Rope]:
    """Rope of mlx.nn.RoPE or mlx-lm's YarnRoPE over all `dims` dims (DeepSeek's kinds), else
    None. `inv` is built lazily: its holder keeps it as a private array too, so that
    set_compiled_decode evaluates it before any trace (loader_utils.eval_constants)."""
    if getattr(rope, "dims", None) != dims:
        return None
    if type(rope) is nn.RoPE:
        d = mx.arange(0, dims // 2, dtype=mx.float32) / (dims // 2)
        inv = mx.power(mx.array(rope.base, mx.float32), -d)
        return Rope(inv, bool(rope.traditional), float(rope.scale), 1.0)
    if type(rope).__name__ == "YarnRoPE" and "_freqs" in rope:
        return Rope(1.0 / rope._freqs.astype(mx.float32), bool(rope.traditional), 1.0,
                    float(rope.mscale))
    return None


def unsupported(q, kv, norm, H: int, nope: int, P: int) -> str:
    """Why the kernel cannot take this call ("" when it can)."""
    if q.dtype not in FLOAT_TYPES or kv.dtype != q.dtype:
        return f"activations of types {q.dtype}, {kv.dtype}"
    if q.ndim != 3 or q.shape[0] * q.shape[1] > MAX_ROWS:
        return "more query rows than a decode step"
    if q.shape[-1] != H * (nope + P) or P % 2:
        return "query width"
    if type(norm) is not nn.RMSNorm or kv.shape[-1] != norm.weight.shape[0] + P:
        return "latent norm"
    return ""


@lru_cache(maxsize=64)
def launch(B, L, H, nope, P, R, dtype, traditional, scale, rope_scale, mscale, eps, rows=False):
    return dict(
        template=[("H", H), ("NOPE", nope), ("P", P), ("R", R), ("L", L), ("NW", WARPS),
                  ("TRAD", int(traditional)), ("T", dtype), ("SCL", float_bits(scale)),
                  ("RS", float_bits(rope_scale)), ("MS", float_bits(mscale)),
                  ("EPS", float_bits(eps))],
        grid=((H + 1) * WARPS * 32, B * L, 1),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(B, H, L, nope) if B > 1 else (H, L, nope),
                       (B, 1, H * L, P) if rows else (B, H, L, P),
                       (B, 1, L, R), (B, 1, L, P)],
        output_dtypes=[dtype] * 4,
    )


def positions(offset) -> mx.array:
    # An int offset becomes a small array (compiled decode passes one array of shape (1,)
    # for all layers: then neither op below adds a graph node).
    return offset.reshape(1).astype(mx.int32) if isinstance(offset, mx.array) else \
        mx.array([offset], dtype=mx.int32)


def mla_prep(q, kv, norm, offset, rope: Rope, H, nope, P, scale, backend, rows=False):
    """(q_nope, scale * rope(q_pe), norm(latent), rope(k_pe)) of a decode step, one launch."""
    # q: [B, L, H*(nope+P)], kv: [B, L, R+P] -> q_nope [B, H, L, nope] ([H, L, nope] when B
    # is 1: embed_q's per-head matmul then needs no broadcasts), q_pe [B, H, L, P] (rows:
    # [B, 1, H * L, P], the buffer attention's layout, the same memory when L is 1),
    # latent [B, 1, L, R], k_pe [B, 1, L, P]
    B, L, _ = q.shape
    R = kv.shape[-1] - P
    kw = launch(B, L, H, nope, P, R, q.dtype, rope.traditional, scale, rope.scale, rope.mscale,
                float(norm.eps), rows)
    return tuple(kernel_fn(backend, PREP)(
        inputs=[q, kv, norm.weight, positions(offset), rope.inv], **kw))


def reference(q, kv, norm, offset, rope_module, H, nope, P, scale):
    """The same in MLX ops (what MLAttention.split_rope and the query scale compute)."""
    B, L, _ = q.shape
    q = q.reshape(B, L, H, nope + P).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [nope], axis=-1)
    latent, k_pe = mx.split(kv, [kv.shape[-1] - P], axis=-1)
    latent = norm(latent)[:, None]
    k_pe = k_pe.reshape(B, 1, L, P)
    return q_nope, rope_module(q_pe, offset) * scale, latent, rope_module(k_pe, offset)


def probe(backend, signature) -> float:
    """Largest relative error of the four outputs against the float32 reference, on random
    data at a long position (where rope angles are large). signature: (B, L, H, nope, P, R,
    dtype, traditional)."""
    from .probe import relative_error

    B, L, H, nope, P, R, dtype, traditional = signature
    rope_module = nn.RoPE(P, traditional=traditional, base=10000)
    k = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((B, L, H * (nope + P)), key=k[0]).astype(dtype)
    kv = (3 * mx.random.normal((B, L, R + P), key=k[1])).astype(dtype)
    norm = nn.RMSNorm(R, eps=1e-6)
    norm.weight = (1 + 0.3 * mx.random.normal((R,), key=k[2])).astype(dtype)
    offset, scale = 30011, 0.1352
    got = mla_prep(q, kv, norm, offset, rope_table(rope_module, P), H, nope, P, scale, backend)
    f32 = lambda a: a.astype(mx.float32)
    norm32 = nn.RMSNorm(R, eps=1e-6)
    norm32.weight = f32(norm.weight)
    want = reference(f32(q), f32(kv), norm32, offset, rope_module, H, nope, P, scale)
    return max(relative_error(a, b) for a, b in zip(got, want))


def selftest(backend: str, echo=print, tokens=(1, 2), heads=128):
    """The kernel against the float32 reference and MLX's ops at DeepSeek-V3's widths (bf16,
    YaRN rope at position 4000), for `mlxkt selftest`: on a Mac, whether MLXKT_MLA_PREP=1
    is right and pays."""
    from mlx_lm.models.rope_utils import initialize_rope

    from .dispatch import probe_tolerance
    from .probe import relative_error
    from .selftest import median_time, timed_row  # selftest imports this module

    nope, P, R, offset, scale = 128, 64, 512, 4000, 0.1352
    rope = initialize_rope(P, 10000, True, {"type": "yarn", "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0,
                                            "original_max_position_embeddings": 4096}, 163840)
    table = rope_table(rope, P)
    rows = []
    echo(f"{'mla prologue':22} {'tok':>3} {'status':>6} {'rel err':>9} {'kernel us':>9} {'mlx us':>9}")
    for n in tokens:
        def measure():
            k = mx.random.split(mx.random.key(n), 4)
            q = mx.random.normal((1, n, heads * (nope + P)), key=k[0]).astype(mx.bfloat16)
            kv = mx.random.normal((1, n, R + P), key=k[1]).astype(mx.bfloat16)
            norm = nn.RMSNorm(R, eps=1e-6)
            norm.weight = (1 + 0.3 * mx.random.normal((R,), key=k[2])).astype(mx.bfloat16)
            norm32 = nn.RMSNorm(R, eps=1e-6)
            norm32.weight = norm.weight.astype(mx.float32)
            got = mla_prep(q, kv, norm, offset, table, heads, nope, P, scale, backend)
            want = reference(q.astype(mx.float32), kv.astype(mx.float32), norm32, offset, rope,
                             heads, nope, P, scale)
            err = max(relative_error(a, b) for a, b in zip(got, want))
            # The MLX side as decode runs it: the no-rope queries made contiguous for embed_q.
            ins = [(q + i, kv + i) for i in range(4)]
            mx.eval(ins)
            k_s = median_time(lambda a, b: mla_prep(a, b, norm, offset, table, heads, nope, P,
                                                    scale, backend), ins)
            m_s = median_time(lambda a, b: [mx.contiguous(o) for o in reference(
                a, b, norm, offset, rope, heads, nope, P, scale)], ins)
            return err, k_s, m_s

        rows.append(timed_row({"kernel": "mla-prep", "tokens": n}, "deepseek-v3", n, measure,
                              probe_tolerance(mx.bfloat16), echo))
    return rows
