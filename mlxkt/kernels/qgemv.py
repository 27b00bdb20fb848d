"""Dense quantized linear layers at decode sizes (1 to 8 tokens): one kernel per call.

On an H200 (MLX 0.32.4 CUDA) MLX's own quantized matrix-vector kernel (`qmv`) read the
attention projections, shared experts and lm_head of the DeepSeek-V3 bench slice at 23% of
copy bandwidth: 1.9 of 3.3 ms per decode token (benchmarks/gpu_profile.py). This kernel
(metal/qgemv.inc) splits each row's chunks over the warps of a block so that every shape
keeps enough loads in flight. The reference is `mx.quantized_matmul`.
"""

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import sources
from .moe import FLOAT_TYPES, MAX_TOKENS, TYPE_KIND, float_bits, kernel_fn



def quant_params(layer):
    """(bits, group_size) of an nn.QuantizedLinear the kernel can read, else None."""
    if not isinstance(layer, nn.QuantizedLinear) or getattr(layer, "mode", "affine") != "affine":
        return None
    if layer.get("biases") is None or layer.weight.dtype != mx.uint32:
        return None
    bits, gs = layer.bits, layer.group_size
    if bits not in (2, 4, 8) or gs not in (32, 64, 128):
        return None
    if layer.scales.dtype not in FLOAT_TYPES or layer.weight.ndim != 2:
        return None
    return bits, gs


def unsupported(layer, x) -> str:
    """Why the kernel cannot compute layer(x) ("" when it can)."""
    q = quant_params(layer)
    if q is None:
        return "weights are not affine-quantized (2/4/8 bits, group 32/64/128)"
    if x.dtype not in FLOAT_TYPES:
        return f"activations of type {x.dtype}"
    return ""


def decode_sized(x) -> bool:
    return x.size // x.shape[-1] <= MAX_TOKENS


def row_pieces(D, bits, gs, wp=None) -> tuple:
    """(words per piece, pieces per row): a piece is one load of 4, 8 or 16 bytes, by default
    the largest inside a quantization group."""
    vpw = 32 // bits
    wp = wp or max(w for w in (1, 2, 4) if vpw * w <= gs)
    if gs % (vpw * wp) or D % (vpw * wp):
        raise ValueError(f"{wp} words per piece do not tile groups of {gs} and rows of {D}")
    return wp, D // (vpw * wp)


def launch_config(O, D, bits, gs, tokens=1, nw=None, rpw=None, wp=None, sa=None) -> dict:
    """Warps per block (they split each row's pieces), rows per block, words per piece (one
    load of 4, 8 or 16 bytes), pieces per thread per load stage. Defaults: the H200's
    fastest of benchmarks/gemv.py (see metal/README.md)."""
    given_wp = wp
    wp, pieces = row_pieces(D, bits, gs, wp)
    short = pieces < 64 and nw is None and rpw is None
    rows = 4 if short else 8  # short rows: 2 warps x 4 rows (q_b_proj: 10% over 1 x 8) ...
    if short and given_wp is None:  # ... or smaller pieces, one per thread of whole warps
        fit = [w for w in (wp, wp // 2) if w and (D // (32 // bits * w)) % 32 == 0]
        if fit:  # q_b_proj at 4 bits: 3 warps of 8-byte pieces, 8 rows: 11.8 against 13.9 µs
            wp, pieces = row_pieces(D, bits, gs, fit[0])
            nw, rows = min(4, pieces // 32), 8
    nw = nw or (2 if short else max(1, min(8, round(pieces / 64))))
    rpw = rpw or min(rows, nw * 32 // tokens)
    if rpw * tokens > nw * 32:
        raise ValueError("rows per block x tokens must not exceed the block's threads")
    ppt = math.ceil(pieces / (nw * 32))
    return {"nw": nw, "rpw": rpw, "wp": wp, "sa": min(sa or 1, ppt)}


@lru_cache(maxsize=256)
def launch(O, D, N, bits, gs, dtype, scale_dtype, config=(), norm=None, res=False, lead=None):
    """norm: (g's dtype, epsilon) when x is RMS-normalised inside the kernel; lead: the
    output's leading dims (default (N,))."""
    cfg = launch_config(O, D, bits, gs, N, **dict(config))
    nw, rpw = cfg["nw"], cfg["rpw"]
    tk = TYPE_KIND[dtype]
    gk, eps = (TYPE_KIND[norm[0]], float_bits(norm[1])) if norm else (tk, 0)
    return dict(
        template=[("O", O), ("D", D), ("BITS", bits), ("GS", gs), ("NT", N), ("NW", nw),
                  ("RPW", rpw), ("WP", cfg["wp"]), ("SA", cfg["sa"]), ("TK", tk),
                  ("T", dtype), ("ST", scale_dtype), ("NRM", int(norm is not None)),
                  ("GK", gk), ("EPS", eps), ("RES", int(res))],
        grid=(math.ceil(O / rpw) * nw * 32, 1, 1),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[(*((N,) if lead is None else lead), O)],
        output_dtypes=[dtype],
    )


def quantized_gemv(x, layer, backend, norm=None, residual=None, **config):
    """layer(x) for an nn.QuantizedLinear and x [..., D] with at most 8 rows, by the kernel;
    layer(norm(x)) for an nn.RMSNorm `norm`, + residual [..., O] when given (same launch)."""
    # x: [..., D] -> [..., O]. The kernel reads x, res and y as flat rows: no reshapes
    # around the launch (each one more graph node for MLX's host to build and walk).
    bits, gs = quant_params(layer)
    lead, D = x.shape[:-1], x.shape[-1]
    O = layer.weight.shape[0]
    kw = launch(O, D, x.size // D, bits, gs, x.dtype, layer.scales.dtype,
                tuple(sorted(config.items())),
                None if norm is None else (norm.weight.dtype, norm.eps), residual is not None,
                lead)
    # x stands in for the arrays the kernel does not read.
    g = x if norm is None else norm.weight
    res = x if residual is None else residual
    if res.dtype != x.dtype:
        res = res.astype(x.dtype)
    (y,) = kernel_fn(backend, sources.QGEMV)(
        inputs=[x, layer.weight, layer.scales, layer.biases, g, res], **kw)
    if "bias" in layer:
        y = y + layer.bias
    return y


def fusable_norm(norm) -> bool:
    """Whether the kernel can fold `norm` into its call: a plain nn.RMSNorm over the input."""
    return type(norm) is nn.RMSNorm and norm.weight.dtype in FLOAT_TYPES


def reference(x, layer, norm=None, residual=None):
    """layer(x) in plain MLX ops (what nn.QuantizedLinear computes), with norm before and
    residual after like quantized_gemv."""
    y = nn.QuantizedLinear.__call__(layer, x if norm is None else norm(x))
    return y if residual is None else residual + y


def linear_like(layer, cls=nn.QuantizedLinear, **arrays):
    """A `cls` (an nn.QuantizedLinear class) with layer's quantization and arrays; `arrays`
    replaces some of them. No new weights are made: the shell is built 1 x group_size."""
    kw = {"mode": layer.mode} if hasattr(layer, "mode") else {}
    new = cls(layer.group_size, 1, bias=False, group_size=layer.group_size, bits=layer.bits, **kw)
    for name, value in {**dict(layer.items()), **arrays}.items():  # weight, scales, biases, bias
        setattr(new, name, value)
    new.freeze()
    return new


def random_linear(O, D, bits=4, group_size=64, dtype=mx.float32, seed=0):
    """An nn.QuantizedLinear with random packed words and realistic scales/biases."""
    from .probe import random_switch_linear

    sw = random_switch_linear(1, O, D, bits, group_size, dtype, mx.random.key(seed))
    layer = nn.QuantizedLinear(group_size, 1, bias=False, group_size=group_size, bits=bits)
    layer.weight, layer.scales, layer.biases = sw.weight[0], sw.scales[0], sw.biases[0]
    return layer


def probe(backend, signature) -> float:
    """Relative error of the kernel against the float32 reference on random data.
    signature: (O, D, N, bits, gs, dtype, scale_dtype[, norm (g dtype, eps) or None, res])"""
    from .probe import relative_error

    O, D, N, bits, gs, dtype, scale_dtype, *fused = signature
    norm_sig, res = fused if fused else (None, False)
    layer = random_linear(O, D, bits, gs, scale_dtype)
    x = mx.random.normal((N, D), key=mx.random.key(1)).astype(dtype)
    norm, residual = probe_folds(N, O, D, dtype, norm_sig, res)
    y = quantized_gemv(x, layer, backend, norm, residual)
    ref = reference(x.astype(mx.float32), _float32_copy(layer), norm,
                    None if residual is None else residual.astype(mx.float32))
    mx.eval(y, ref)
    return relative_error(y, ref)


def probe_folds(N, O, D, dtype, norm_sig, res):
    """(nn.RMSNorm or None, residual [N, O] or None) of a probe's signature, random."""
    norm = residual = None
    if norm_sig is not None:
        norm = nn.RMSNorm(D, eps=norm_sig[1])
        norm.weight = (1 + 0.3 * mx.random.normal((D,), key=mx.random.key(2))).astype(norm_sig[0])
    if res:
        residual = mx.random.normal((N, O), key=mx.random.key(3)).astype(dtype)
    return norm, residual


def _float32_copy(layer):
    return linear_like(layer, scales=layer.scales.astype(mx.float32),
                       biases=layer.biases.astype(mx.float32))


SELFTEST_SHAPES = {"deepseek-v3 o_proj": (7168, 16384), "deepseek-v3 q_a_proj": (1536, 7168),
                   "mixtral q_proj": (4096, 4096)}


def selftest(backend: str, echo=print, tokens=(1, 2), shapes=None):
    """The GEMV kernel against MLX's quantized matmul, 4-bit group 64, bf16 (for `mlxkt
    selftest`): error against the float32 reference and eval-only µs of both. The rows
    named "+norm+res" fold an RMSNorm and a residual into the launch, as compiled decode
    does."""
    from .dispatch import probe_tolerance
    from .probe import relative_error
    from .selftest import median_time, timed_row  # selftest imports this module

    rows = []
    echo(f"{'gemv':22} {'tok':>3} {'status':>6} {'rel err':>9} {'kernel us':>9} {'mlx us':>9}")
    cases = [(name, O, D, False) for name, (O, D) in (shapes or SELFTEST_SHAPES).items()]
    name, O, D, _ = cases[min(1, len(cases) - 1)]
    cases.append((name + " +norm+res", O, D, True))
    for name, O, D, fold in cases:
        layers = [random_linear(O, D, 4, 64, mx.bfloat16, seed=s) for s in range(4)]
        norm = nn.RMSNorm(D) if fold else None
        for n in tokens:
            def measure():
                x = mx.random.normal((n, D)).astype(mx.bfloat16)
                res = mx.random.normal((n, O)).astype(mx.bfloat16) if fold else None
                err = relative_error(
                    quantized_gemv(x, layers[0], backend, norm, res),
                    reference(x.astype(mx.float32), _float32_copy(layers[0]), norm,
                              None if res is None else res.astype(mx.float32)))
                ins = [(m,) for m in layers]
                k_s = median_time(lambda m: quantized_gemv(x, m, backend, norm, res), ins,
                                  prebuilt=True)
                r_s = median_time(lambda m: reference(x, m, norm, res), ins, prebuilt=True)
                return err, k_s, r_s

            rows.append(timed_row({"kernel": "gemv", "shape": name, "tokens": n}, name, n,
                                  measure, probe_tolerance(mx.bfloat16), echo))
    return rows
