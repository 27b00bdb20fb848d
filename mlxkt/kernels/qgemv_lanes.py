"""Quantized GEMV for short rows, one matrix or one per head (metal/qgemv_lanes.inc).

At decode MLA multiplies each head's query by its own slice of kv_b_proj (embed_q: rows of
128 inputs, 512 rows a head) and each head's output by another (unembed_out: rows of 512).
MLX runs those as batched quantized matmuls at about 15% of copy bandwidth on an H100
(benchmarks/RESULTS.md), and qgemv.inc, which spreads one row over a block, would leave most
lanes idle on rows of 4 to 16 pieces. This kernel gives a row to a few lanes instead. The
reference is `mx.quantized_matmul` (what nn.QuantizedLinear and mlx-lm's
QuantizedMultiLinear compute).
"""

from functools import lru_cache

import mlx.core as mx

from . import sources
from .moe import FLOAT_TYPES, MAX_TOKENS, TYPE_KIND, float_bits, kernel_fn
from .qgemv import row_pieces

SPEC = sources.KernelSpec(
    name="mlxkt_qgemv_lanes",
    body="qgemv_lanes.inc",
    inputs=("x", "w", "scales", "biases", "g", "res"),
    outputs=("y",),
    raw16=(("TK", "x"), ("GK", "g")),
)

# One matrix's rows of fewer pieces (16-byte loads at 4 bits) than this may take this kernel
# (a linear's `lanes = True`): q_b_proj's did not pay in the engine on an H100 (24.5 µs per
# call with its folded norm, 4 warps x 2 rows, against 17.9 for qgemv.inc; not re-measured
# with the 2 x 4 default or 8-byte pieces, which matched qgemv.inc alone), so it is off.
SHORT_PIECES = 64


def launch_config(D, bits, gs, rows, tokens=1, lpr=None, rpl=None, nw=None, wp=None) -> dict:
    """Lanes per row, rows per lane group, warps per block, words per piece. `rows`: rows per
    head (all rows for one matrix), which a block's rows must divide. Defaults: the largest
    piece inside a group (16 bytes at 4 and 8 bits), as many lanes per row as divide its
    pieces (up to 32), 2 warps x 4 rows (benchmarks/gemv_lanes.py on an H100, GPU time at one
    token: the fastest for embed_q, 4.6 µs; unembed_out 4.9, within 0.4 µs of its best),
    shrunk until a block fits the head. ValueError when no block does."""
    if tokens > MAX_TOKENS:
        raise ValueError(f"{tokens} tokens: the kernel takes at most {MAX_TOKENS}")
    wp, lpr = row_lanes(D, bits, gs, wp, lpr)
    for n, r in ([(nw, rpl)] if nw and rpl else
                 [(nw or a, rpl or b) for a, b in ((2, 4), (2, 2), (2, 1), (1, 1))]):
        if rows % (n * (32 // lpr) * r) == 0:
            return {"lpr": lpr, "rpl": r, "nw": n, "wp": wp}
    raise ValueError(f"no block of lane groups tiles {rows} rows")


def row_lanes(D, bits, gs, wp=None, lpr=None) -> tuple:
    """(words per piece, lanes per row) for rows of D inputs: the largest piece inside a group
    by default, and as many lanes as divide the row's pieces (up to 32, at most 8 pieces a
    lane). ValueError when they do not split."""
    wp, pr = row_pieces(D, bits, gs, wp)
    lpr = lpr or max(n for n in (1, 2, 4, 8, 16, 32) if pr % n == 0)
    if pr % lpr or 32 % lpr or pr // lpr > 8:
        raise ValueError(f"{lpr} lanes per row do not split {pr} pieces (at most 8 a lane)")
    return wp, lpr


def short_rows(D, bits, gs) -> bool:
    """Rows this kernel takes over from qgemv.inc's for one matrix."""
    try:
        return row_pieces(D, bits, gs)[1] < SHORT_PIECES
    except ValueError:
        return False


def supported(D, bits, gs, rows, dtype, scale_dtype) -> bool:
    if dtype not in FLOAT_TYPES or scale_dtype not in FLOAT_TYPES:
        return False
    try:
        launch_config(D, bits, gs, rows)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=256)
def launch(O, HO, D, N, bits, gs, dtype, scale_dtype, config=(), norm=None, res=False,
           lead=None, shape=None):
    """O rows in all, HO per head; N tokens per head; norm: (g's dtype, epsilon) when x is
    RMS-normalised inside the kernel; lead: the output's leading dims; shape: the output's
    whole shape instead (the same memory)."""
    cfg = launch_config(D, bits, gs, HO, N, **dict(config))
    nw, lpr, rpl = cfg["nw"], cfg["lpr"], cfg["rpl"]
    tk = TYPE_KIND[dtype]
    gk, eps = (TYPE_KIND[norm[0]], float_bits(norm[1])) if norm else (tk, 0)
    rpb = nw * (32 // lpr) * rpl
    return dict(
        template=[("HO", HO), ("D", D), ("BITS", bits), ("GS", gs), ("NT", N),
                  ("NW", nw), ("LPR", lpr), ("RPL", rpl), ("WP", cfg["wp"]), ("TK", tk),
                  ("T", dtype), ("ST", scale_dtype), ("NRM", int(norm is not None)),
                  ("GK", gk), ("EPS", eps), ("RES", int(res))],
        grid=(O // rpb * nw * 32, 1, 1),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[shape or (*((N,) if lead is None else lead), HO)],
        output_dtypes=[dtype],
    )


def lanes_gemv(x, weight, scales, biases, bits, gs, backend, heads=False, norm=None,
               residual=None, shape=None, **config):
    """x @ W^T by the kernel, for at most 8 rows of x per matrix.
    heads=False: W [O, D*bits/32], x [..., D] -> [..., O]; norm (an nn.RMSNorm) and
    residual [..., O] folded in as in qgemv.quantized_gemv.
    heads=True: W [H, O, D*bits/32] (one matrix per head), x [H, L, D] -> [H, L, O], or x of
    any shape that holds [H, L, D] in order -> `shape` (kernels read flat rows and declare
    their outputs' shapes, so no reshape node is made)."""
    D = x.shape[-1]
    if heads:
        H = weight.shape[0]
        L = x.size // (H * D)
        O, HO, N, lead = H * weight.shape[1], weight.shape[1], L, (H, L)
    else:
        O = HO = weight.shape[0]
        N, lead = x.size // D, x.shape[:-1]
    kw = launch(O, HO, D, N, bits, gs, x.dtype, scales.dtype, tuple(sorted(config.items())),
                None if norm is None else (norm.weight.dtype, norm.eps), residual is not None,
                lead, shape)
    # x stands in for the arrays the kernel does not read.
    g = x if norm is None else norm.weight
    res = x if residual is None else residual.astype(x.dtype)
    (y,) = kernel_fn(backend, SPEC)(inputs=[x, weight, scales, biases, g, res], **kw)
    return y


def reference(x, weight, scales, biases, bits, gs, norm=None, residual=None):
    """The same in plain MLX ops: one quantized matmul (batched over heads for 3-D W)."""
    y = mx.quantized_matmul(x if norm is None else norm(x), weight, scales, biases,
                            transpose=True, group_size=gs, bits=bits)
    return y if residual is None else residual + y


def random_heads(H, O, D, bits=4, gs=64, dtype=mx.float32, seed=0):
    """(weight, scales, biases) of H random quantized [O, D] matrices, as MultiLinear's."""
    from .probe import random_switch_linear

    sw = random_switch_linear(H, O, D, bits, gs, dtype, mx.random.key(seed))
    return sw.weight, sw.scales, sw.biases


def probe(backend, signature) -> float:
    """Relative error of the kernel against the float32 reference on random data.
    signature: (H or 0 for one matrix, O, D, N, bits, gs, dtype, scale_dtype, norm, res)"""
    from .probe import relative_error
    from .qgemv import probe_folds

    H, O, D, N, bits, gs, dtype, scale_dtype, norm_sig, res = signature
    if H and (norm_sig is not None or res):
        raise ValueError("the per-head call folds no norm or residual")
    w, s, b = random_heads(max(H, 1), O, D, bits, gs, scale_dtype)
    if not H:
        w, s, b = w[0], s[0], b[0]
    x = mx.random.normal((H, N, D) if H else (N, D), key=mx.random.key(1)).astype(dtype)
    norm, residual = probe_folds(N, O, D, dtype, norm_sig, res)
    y = lanes_gemv(x, w, s, b, bits, gs, backend, bool(H), norm, residual)
    f32 = mx.float32
    ref = reference(x.astype(f32), w, s.astype(f32), b.astype(f32), bits, gs, norm,
                    None if residual is None else residual.astype(f32))
    mx.eval(y, ref)
    return relative_error(y, ref)


SELFTEST_SHAPES = {"deepseek-v3 embed_q": (128, 512, 128), "deepseek-v3 unembed_out":
                   (128, 128, 512), "deepseek-v3 q_b_proj": (0, 24576, 1536)}


def selftest(backend: str, echo=print, tokens=(1, 2), shapes=None):
    """The kernel against MLX's quantized matmul, 4-bit group 64, bf16 (for `mlxkt
    selftest`): error against the float32 reference and eval-only µs of both."""
    from .dispatch import probe_tolerance
    from .probe import relative_error
    from .selftest import median_time, timed_row

    rows = []
    echo(f"{'gemv lanes':22} {'tok':>3} {'status':>6} {'rel err':>9} {'kernel us':>9} "
         f"{'mlx us':>9}")
    for name, (H, O, D) in (shapes or SELFTEST_SHAPES).items():
        mats = [random_heads(max(H, 1), O, D, 4, 64, mx.bfloat16, seed=s) for s in range(4)]
        if not H:
            mats = [tuple(a[0] for a in m) for m in mats]
        for n in tokens:
            def measure():
                x = mx.random.normal((H, n, D) if H else (n, D)).astype(mx.bfloat16)
                w, s, b = mats[0]
                err = relative_error(
                    lanes_gemv(x, w, s, b, 4, 64, backend, bool(H)),
                    reference(x.astype(mx.float32), w, s.astype(mx.float32),
                              b.astype(mx.float32), 4, 64))
                k_s = median_time(lambda m: lanes_gemv(x, *m, 4, 64, backend, bool(H)),
                                  [(m,) for m in mats], prebuilt=True)
                r_s = median_time(lambda m: reference(x, *m, 4, 64), [(m,) for m in mats],
                                  prebuilt=True)
                return err, k_s, r_s

            rows.append(timed_row({"kernel": "gemv-lanes", "shape": name, "tokens": n}, name,
                                  n, measure, probe_tolerance(mx.bfloat16), echo))
    return rows

