"""MLA decode attention over the compressed cache: two kernels per layer and token.

One query token per sequence attends over the cache's latent rows (keys and values at once)
and roped shared keys (metal/mla_partial.inc, then metal/mla_reduce.inc to merge the splits
of the keys). MLX's fused attention does not take a 512-wide head, so the plain path is a
rope-score matmul plus MLX's fallback (scale, score matmul, mask add, softmax, value matmul):
about 7 launches per layer on CUDA, each with MLX's host cost. The kernels read the cache
buffers in place (no slicing: the valid length rides in `meta`), so inside a compiled step
they are traced once per buffer size, not per token.

The kernels use no tensor cores: on long caches MLX's GEMMs win, hence a key limit per
backend (`max_keys`). The reference is `reference()` (plain MLX, float32).
"""

import math
import os
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from . import sources
from .moe import FLOAT_TYPES, TYPE_KIND, kernel_fn

PARTIAL = sources.KernelSpec(
    name="mlxkt_mla_partial",
    body="mla_partial.inc",
    inputs=("q", "qpe", "kv", "kpe", "meta", "scale"),
    outputs=("o", "ml"),
    raw16=(("KK", "kv"), ("KK", "kpe")),
)

REDUCE = sources.KernelSpec(
    name="mlxkt_mla_reduce",
    body="mla_reduce.inc",
    inputs=("o", "ml", "meta"),
    outputs=("out",),
)

ENV = "MLXKT_MLA_KERNEL"  # 1/0: force the kernels on (any GPU) or off
MAX_KEYS_ENV = "MLXKT_MLA_MAX_KEYS"
CUDA_MAX_KEYS = 4096  # provisional, see max_keys
REDUCE_THREADS = 128


def heads_per_block(H: int, cap: int = 8) -> int:
    """The most heads (a divisor of H, at most cap) whose queries a block holds."""
    return max(d for d in range(1, min(H, cap) + 1) if H % d == 0)


def launch_config(rows: int, H: int, hg=None, nw=4, kpt=1, blocks=512) -> dict:
    """Heads per block, warps, keys per thread per tile, and the split of a cache buffer of
    `rows` rows: whole tiles per split, about `blocks` pass-1 blocks in all. Static per
    buffer size, as a compiled trace needs."""
    hg = hg or heads_per_block(H)
    tile = 32 * nw * kpt
    per_group = max(1, math.ceil(blocks / (H // hg)))
    kb = tile * max(1, math.ceil(rows / per_group / tile))
    return {"hg": hg, "nw": nw, "kpt": kpt, "kb": kb, "ns": math.ceil(rows / kb)}


def decode_meta(length: int, rows: int, H: int, **config) -> mx.array:
    """The kernels' int32 [valid keys, buffer rows, keys per split, splits] (config as
    given to mla_decode)."""
    cfg = launch_config(rows, H, **config)
    return mx.array([length, rows, cfg["kb"], cfg["ns"]], dtype=mx.int32)


@lru_cache(maxsize=None)
def scale_array(scale: float) -> mx.array:
    return mx.array([scale], dtype=mx.float32)


def mla_decode(q, q_pe, kv, kpe, meta, scale, backend, **config):
    """Softmax(scale q.kv + q_pe.kpe) @ kv over the first meta[0] cache rows, per head."""
    # q: [B, H, 1, R], q_pe: [B, H, 1, P] (pre-scaled), kv: [B, 1, SM, R], kpe: [B, 1, SM, P],
    # meta: decode_meta(..., **config), scale: float32 [1] -> [B, H, 1, R] (q.dtype)
    B, H, _, R = q.shape
    P, SM = q_pe.shape[-1], kv.shape[2]
    cfg = launch_config(SM, H, **config)
    hg, nw, ns = cfg["hg"], cfg["nw"], cfg["ns"]
    o, ml = kernel_fn(backend, PARTIAL)(
        inputs=[q, q_pe, kv, kpe, meta, scale],
        template=[("H", H), ("R", R), ("P", P), ("HG", hg), ("NW", nw), ("KPT", cfg["kpt"]),
                  ("T", q.dtype), ("KT", kv.dtype), ("KK", TYPE_KIND[kv.dtype])],
        grid=(ns * (H // hg) * nw * 32, B, 1),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[(B, ns, H, R), (B, ns, H, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    (out,) = kernel_fn(backend, REDUCE)(
        inputs=[o, ml, meta],
        template=[("H", H), ("R", R), ("NT", REDUCE_THREADS), ("T", q.dtype)],
        grid=(B * H * REDUCE_THREADS, 1, 1),
        threadgroup=(REDUCE_THREADS, 1, 1),
        output_shapes=[(B, H, R)],
        output_dtypes=[q.dtype],
    )
    return out.reshape(B, H, 1, R)


def reference(q, q_pe, kv, kpe, length: int, scale: float):
    """The same attention in plain MLX ops, in float32 (cast back to q's type)."""
    f32 = mx.float32
    k, kp = kv[:, :, :length].astype(f32), kpe[:, :, :length].astype(f32)
    scores = (q.astype(f32) * scale) @ k.swapaxes(-1, -2) + q_pe.astype(f32) @ kp.swapaxes(-1, -2)
    return (mx.softmax(scores, axis=-1) @ k).astype(q.dtype)


def plain_attention(q, q_pe, kv, kpe, length: int, scale: float):
    """What the engine runs without the kernels (layers/mla.py, one query token): the rope
    scores as the additive mask of MLX's attention over the latent."""
    k, kp = kv[:, :, :length], kpe[:, :, :length]
    pe_scores = q_pe @ kp.swapaxes(-1, -2)
    return mx.fast.scaled_dot_product_attention(q, k, k, scale=scale, mask=pe_scores)


def unsupported(q, q_pe, kv, kpe) -> Optional[str]:
    """Why the kernels cannot take these arrays (None when they can)."""
    if q.shape[2] != 1 or kv.shape[1] != 1:
        return "one query token over a shared latent only"
    if q.dtype not in FLOAT_TYPES or kv.dtype not in FLOAT_TYPES:
        return "float arrays only"
    if q_pe.dtype != q.dtype or kpe.dtype != kv.dtype:
        return "mixed types"
    if q.shape[-1] % 4 or q_pe.shape[-1] % 4:
        return "latent and rope widths must be multiples of 4"
    return None


def max_keys(backend: str) -> int:
    """Longest cache the kernels take (MLXKT_MLA_MAX_KEYS overrides)."""
    value = os.environ.get(MAX_KEYS_ENV, "").strip()
    if value:
        return int(value)
    return CUDA_MAX_KEYS if backend == "cuda" else 1 << 30


def random_problem(B, H, R, P, rows, dtype=mx.float32, seed=0):
    """q, q_pe, kv, kpe with unit-variance entries (and a cache buffer of `rows` rows)."""
    kq, kp, kk, ke = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((B, H, 1, R), key=kq).astype(dtype)
    q_pe = mx.random.normal((B, H, 1, P), key=kp).astype(dtype)
    kv = mx.random.normal((B, 1, rows, R), key=kk).astype(dtype)
    kpe = mx.random.normal((B, 1, rows, P), key=ke).astype(dtype)
    return q, q_pe, kv, kpe


def probe(backend: str, signature) -> float:
    """Relative error of the kernels against the float32 reference on random data."""
    from .probe import relative_error

    H, R, P, dtype, cache_dtype = signature
    q, q_pe, kv, kpe = random_problem(1, H, R, P, 300)
    q, q_pe = q.astype(dtype), q_pe.astype(dtype)
    kv, kpe = kv.astype(cache_dtype), kpe.astype(cache_dtype)
    scale = 0.5 / math.sqrt(R)
    y = mla_decode(q, q_pe, kv, kpe, decode_meta(257, 300, H), scale_array(scale), backend)
    ref = reference(q, q_pe, kv, kpe, 257, scale)
    mx.eval(y, ref)
    return relative_error(y, ref.astype(mx.float32))


def selftest(backend: str, echo=print, contexts=(1024, 4096), heads=128):
    """The kernels against the float32 reference and against the plain path at DeepSeek-V3's
    attention shape (bf16), for `mlxkt selftest`: on a Mac, the numbers that say whether
    MLXKT_MLA_KERNEL=1 pays."""
    from .dispatch import probe_tolerance
    from .probe import relative_error
    from .selftest import median_time, timed_row  # selftest imports this module

    R, P = 512, 64
    scale = 1.0 / math.sqrt(R + P)
    rows = []
    echo(f"{'mla decode':22} {'keys':>5} {'status':>6} {'rel err':>9} {'kernel us':>9} {'plain us':>9}")
    for S in contexts:
        def measure():
            buf = 256 * math.ceil((S + 1) / 256)
            caches = [random_problem(1, heads, R, P, buf, mx.bfloat16, seed=i) for i in range(4)]
            q, q_pe = caches[0][0], caches[0][1]
            meta, sc = decode_meta(S, buf, heads), scale_array(scale)
            err = relative_error(mla_decode(q, q_pe, caches[0][2], caches[0][3], meta, sc, backend),
                                 reference(q, q_pe, caches[0][2], caches[0][3], S, scale))
            ins = [(c[2], c[3]) for c in caches]
            k_s = median_time(lambda kv, kpe: mla_decode(q, q_pe, kv, kpe, meta, sc, backend),
                              ins, prebuilt=True)
            p_s = median_time(lambda kv, kpe: plain_attention(q, q_pe, kv, kpe, S, scale), ins,
                              prebuilt=True)
            return err, k_s, p_s

        rows.append(timed_row({"kernel": "mla-decode", "keys": S}, "deepseek-v3", S, measure,
                              probe_tolerance(mx.bfloat16), echo,
                              us_keys=("kernel_us", "plain_us"), widths=(22, 5)))
    echo(f"(the MLA decode kernels are off unless {ENV}=1; they pay where 'kernel us' is lower)")
    return rows
