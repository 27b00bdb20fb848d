"""MLA decode queries in one launch: q_b_proj, the query rope and embed_q (metal/mla_queries.inc).

After MLA's stacked down projections a one-token decode step ran q_b_proj's GEMV, the MLA
prologue (kernels/mla_prep.py) and embed_q's lanes GEMV: three launches that wait on one
another, plus two slice nodes for the q_a and kv parts of the projections' output. MLX's host
spends about 10 µs on each kernel it launches and ~3 µs on each node. This kernel takes the
projections' output whole and gives the same four arrays: q_lat and the scaled, roped q_pe
in the attention's rows layout, the normalised latent and the roped shared key. A block per
head computes its 192 rows of q_b_proj (the q_a norm folded in), its rope, and its 512 rows
of embed_q; one more block does the cache entry. The reference is `reference()`: the MLX ops
of MLAttention.absorbed_queries.
"""

from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..device import env_switch
from . import sources
from .dispatch import checked, gpu_backend, kernels_enabled, probe_tolerance
from .mla_prep import Rope, positions, rope_table
from .moe import FLOAT_TYPES, float_bits, kernel_fn
from .qgemv import _float32_copy, quant_params
from .qgemv_lanes import row_lanes

SPEC = sources.KernelSpec(
    name="mlxkt_mla_queries",
    body="mla_queries.inc",
    inputs=("a", "gq", "wq", "sq", "bq", "we", "se", "be", "gkv", "pos", "inv"),
    outputs=("ql", "qp", "lat", "kp"),
)

ENV = "MLXKT_MLA_QUERIES"  # 1/0: force the kernel on (any GPU) or off
WARPS = 8
ROWS_Q = 4  # q_b_proj's rows per lane group a pass (embed_q's: all its rows in one pass)


def backend_for(forced: Optional[bool] = None) -> Optional[str]:
    """The GPU backend that should run the kernel, or None. forced (a layer's switch) or
    MLXKT_MLA_QUERIES=1/0; unset: on CUDA only (measured there; nobody has timed it on a Mac)."""
    backend = gpu_backend() if kernels_enabled() else None
    if backend is None:
        return None
    on = env_switch(ENV) if forced is None else forced
    return backend if (backend == "cuda" if on is None else on) else None


def unsupported(x, q_b_proj, q_norm, embed_q, kv_norm, rope: Optional[Rope], H, nope, P) -> str:
    """Why the kernel cannot take a step of the activations x ("" when it can)."""
    if x.dtype not in FLOAT_TYPES or x.size != x.shape[-1]:
        return "not one token of one sequence"
    if rope is None or P % 2:
        return "rope"
    if any(type(n) is not nn.RMSNorm for n in (q_norm, kv_norm)):
        return "norms"
    QA, R = q_norm.weight.shape[0], kv_norm.weight.shape[0]
    qb, qe = quant_params(q_b_proj), embed_quant(embed_q)
    if qb is None or qe is None or q_b_proj.scales.dtype != embed_q.scales.dtype:
        return "weights not affine-quantized alike"
    if "bias" in q_b_proj:
        return "q_b_proj has a bias"
    if q_b_proj.weight.shape[0] != H * (nope + P) or embed_q.weight.shape[:2] != (H, R):
        return "weight shapes"
    try:
        row_lanes(QA, *qb), row_lanes(nope, *qe)
    except ValueError as e:
        return str(e)
    return ""


def embed_quant(layer):
    """(bits, group_size) of a quantized per-head linear (mlx-lm's QuantizedMultiLinear)."""
    if getattr(layer, "mode", "affine") != "affine" or layer.get("biases") is None:
        return None
    if layer.weight.dtype != mx.uint32 or layer.weight.ndim != 3:
        return None
    if layer.bits not in (2, 4, 8) or layer.scales.dtype not in FLOAT_TYPES:
        return None
    return layer.bits, layer.group_size


@lru_cache(maxsize=64)
def launch(H, QA, nope, P, R, qb, qe, dtype, scale_dtype, traditional, scale, rope_scale,
           mscale, eps_q, eps_kv, config=()):
    """qb / qe: (bits, group size) of q_b_proj / embed_q; config: (("nw", n), ("rq", n)) to
    override the warps per block and q_b_proj's rows per lane group a pass."""
    cfg = {"nw": WARPS, "rq": ROWS_Q, **dict(config)}
    (wq, lq), (we, le) = row_lanes(QA, *qb), row_lanes(nope, *qe)
    cfg["re"] = -(-R // (cfg["nw"] * 32 // le))  # embed_q in one pass
    return dict(
        template=[("H", H), ("QA", QA), ("NOPE", nope), ("P", P), ("R", R), ("NW", cfg["nw"]),
                  ("BQ", qb[0]), ("GQ", qb[1]), ("WQ", wq), ("LQ", lq), ("RQ", cfg["rq"]),
                  ("BE", qe[0]), ("GE", qe[1]), ("WE", we), ("LE", le), ("RE", cfg["re"]),
                  ("TRAD", int(traditional)), ("T", dtype), ("ST", scale_dtype),
                  ("SCL", float_bits(scale)), ("RS", float_bits(rope_scale)),
                  ("MS", float_bits(mscale)), ("EQ", float_bits(eps_q)),
                  ("EKV", float_bits(eps_kv))],
        grid=((H + 1) * cfg["nw"] * 32, 1, 1),
        threadgroup=(cfg["nw"] * 32, 1, 1),
        output_shapes=[(1, 1, H, R), (1, 1, H, P), (1, 1, 1, R), (1, 1, 1, P)],
        output_dtypes=[dtype] * 4,
    )


def mla_queries(a, q_b_proj, q_norm, embed_q, kv_norm, rope: Rope, offset, H, nope, P, scale,
                backend, **config):
    """(q_lat, q_pe scaled and roped, latent, k_pe roped) of one token, one launch.
    a: [1, 1, QA + R + P] (q_a, then the latent and the rope key: the stacked down
    projections' output) -> q_lat [1, 1, H, R], q_pe [1, 1, H, P], latent [1, 1, 1, R],
    k_pe [1, 1, 1, P]."""
    QA, R = q_norm.weight.shape[0], kv_norm.weight.shape[0]
    if a.size != QA + R + P:
        raise ValueError(f"a holds {a.size} values, not one token's {QA} + {R} + {P}")
    kw = launch(H, QA, nope, P, R, quant_params(q_b_proj), embed_quant(embed_q), a.dtype,
                q_b_proj.scales.dtype, rope.traditional, scale, rope.scale, rope.mscale,
                float(q_norm.eps), float(kv_norm.eps), tuple(sorted(config.items())))
    inputs = [a, q_norm.weight, q_b_proj.weight, q_b_proj.scales, q_b_proj.biases,
              embed_q.weight, embed_q.scales, embed_q.biases, kv_norm.weight,
              positions(offset), rope.inv]
    return tuple(kernel_fn(backend, SPEC)(inputs=inputs, **kw))


def reference(a, q_b_proj, q_norm, embed_q, kv_norm, rope_module, offset, H, nope, P, scale):
    """The same in MLX ops (what MLAttention.absorbed_queries computes step by step)."""
    QA, R = q_norm.weight.shape[0], kv_norm.weight.shape[0]
    q = nn.QuantizedLinear.__call__(q_b_proj, q_norm(a[..., :QA]))  # [1, 1, H (nope + P)]
    q = q.reshape(H, 1, nope + P)
    q_pe = rope_module(q[None, ..., nope:], offset) * scale  # [1, H, 1, P]
    q_lat = mx.quantized_matmul(q[..., :nope], embed_q.weight, embed_q.scales, embed_q.biases,
                                transpose=True, group_size=embed_q.group_size, bits=embed_q.bits)
    latent = kv_norm(a[..., QA:QA + R])
    k_pe = rope_module(a[..., QA + R:].reshape(1, 1, 1, P), offset)
    return (q_lat.reshape(1, 1, H, R), q_pe.reshape(1, 1, H, P), latent.reshape(1, 1, 1, R),
            k_pe)


def random_problem(H, QA, nope, P, R, qb=(4, 64), qe=(4, 64), dtype=mx.float32, seed=0):
    """(a, q_b_proj, q_norm, embed_q, kv_norm) with random weights of these widths; qb / qe:
    (bits, group size) of q_b_proj / embed_q."""
    from mlx_lm.models.mla import QuantizedMultiLinear

    from .qgemv import random_linear
    from .qgemv_lanes import random_heads

    k = mx.random.split(mx.random.key(seed), 3)
    a = mx.random.normal((1, 1, QA + R + P), key=k[0]).astype(dtype)
    q_b_proj = random_linear(H * (nope + P), QA, *qb, dtype, seed=seed + 1)
    embed_q = QuantizedMultiLinear.__new__(QuantizedMultiLinear)  # no weights to quantize
    nn.Module.__init__(embed_q)
    embed_q.weight, embed_q.scales, embed_q.biases = random_heads(H, R, nope, *qe, dtype,
                                                                  seed=seed + 2)
    embed_q.bits, embed_q.group_size = qe
    embed_q.mode = "affine"
    norms = []
    for n, key in ((QA, k[1]), (R, k[2])):
        norm = nn.RMSNorm(n, eps=1e-6)
        norm.weight = (1 + 0.3 * mx.random.normal((n,), key=key)).astype(dtype)
        norms.append(norm)
    return a, q_b_proj, norms[0], embed_q, norms[1]


def float32(a, q_b_proj, q_norm, embed_q, kv_norm):
    """A problem's arrays in float32 (weights stay packed), for the reference."""
    from ..layers.qlinear import multi_like  # the layers import the kernels

    f32 = mx.float32
    qb = _float32_copy(q_b_proj)
    qe = multi_like(embed_q, type(embed_q))
    qe.scales, qe.biases = embed_q.scales.astype(f32), embed_q.biases.astype(f32)
    norms = []
    for n in (q_norm, kv_norm):
        m = nn.RMSNorm(n.weight.shape[0], eps=n.eps)
        m.weight = n.weight.astype(f32)
        norms.append(m)
    return a.astype(f32), qb, norms[0], qe, norms[1]


def probe(backend, signature) -> float:
    """Largest relative error of the four outputs against the float32 reference on random
    data at a long position. signature: (H, QA, nope, P, R, qb, qe, dtype, traditional)."""
    from .probe import relative_error

    H, QA, nope, P, R, qb, qe, dtype, traditional = signature
    problem = random_problem(H, QA, nope, P, R, qb, qe, dtype)
    rope_module = nn.RoPE(P, traditional=traditional, base=10000)
    offset, scale = 30011, 0.1352
    got = mla_queries(*problem, rope_table(rope_module, P), offset, H, nope, P, scale, backend)
    want = reference(*float32(*problem), rope_module, offset, H, nope, P, scale)
    return max(relative_error(x, y) for x, y in zip(got, want))


@lru_cache(maxsize=None)
def ready(backend: str, signature) -> bool:
    """The kernel's one-time check at this signature (see probe) passed."""
    return checked(f"{backend} MLA queries", lambda: probe(backend, signature),
                   probe_tolerance(signature[7]))


def selftest(backend: str, echo=print, heads=128):
    """The kernel against the float32 reference and MLX's ops at DeepSeek-V3's widths (bf16,
    4-bit group 64, YaRN rope at position 4000), for `mlxkt selftest`: on a Mac, whether
    MLXKT_MLA_QUERIES=1 is right and pays."""
    from mlx_lm.models.rope_utils import initialize_rope

    from .probe import relative_error
    from .selftest import median_time, timed_row  # selftest imports this module

    QA, nope, P, R, offset, scale = 1536, 128, 64, 512, 4000, 0.1352
    rope = initialize_rope(P, 10000, True, {"type": "yarn", "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0,
                                            "original_max_position_embeddings": 4096}, 163840)
    table = rope_table(rope, P)
    echo(f"{'mla queries':22} {'tok':>3} {'status':>6} {'rel err':>9} {'kernel us':>9} {'mlx us':>9}")

    def measure():
        problems = [random_problem(heads, QA, nope, P, R, dtype=mx.bfloat16, seed=s)
                    for s in range(4)]
        first = problems[0]
        got = mla_queries(*first, table, offset, heads, nope, P, scale, backend)
        want = reference(*float32(*first), rope, offset, heads, nope, P, scale)
        err = max(relative_error(x, y) for x, y in zip(got, want))
        k_s = median_time(lambda *p: mla_queries(*p, table, offset, heads, nope, P, scale,
                                                 backend), problems, prebuilt=True)
        m_s = median_time(lambda *p: reference(*p, rope, offset, heads, nope, P, scale),
                          problems, prebuilt=True)
        return err, k_s, m_s

    return [timed_row({"kernel": "mla-queries", "tokens": 1}, "deepseek-v3", 1, measure,
                      probe_tolerance(mx.bfloat16), echo)]
