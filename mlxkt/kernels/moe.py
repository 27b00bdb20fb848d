"""The fused routed-expert MLP: two kernels, gate+up+SwiGLU then down+weights+sum, and
optionally the MoE block's shared expert in the same two launches (DeepSeek-V3/R1's one
shared expert has the routed experts' width: it is walked as one more expert, weight 1).

Shared by every backend: `kernel_fn(backend, spec)` returns mx.fast.metal_kernel /
mx.fast.cuda_kernel objects (or the CPU emulation of the tests), all called the same way.
"""

import math
import struct
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from . import sources

MAX_TOKENS = 8  # the kernels' limits
MAX_PAIRS = 64
TARGET_BLOCKS = 4096
FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)
TYPE_KIND = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}  # kt_load4's kinds (TK, GK, KK)


def float_bits(v: float) -> int:
    """The bits of v as a float32, as a signed int: how a float rides in a kernel's template
    (templates take integers; the body reads it back with KT_AS_FLOAT)."""
    u = struct.unpack("<I", struct.pack("<f", v))[0]
    return u - (1 << 32) if u >= 1 << 31 else u


def quant_params(layer):
    """(bits, group_size) of an affine-quantized switch layer the kernels can read, else None."""
    if getattr(layer, "mode", "affine") != "affine" or "bias" in layer:
        return None
    if getattr(layer, "global_scale", None) is not None or layer.get("biases") is None:
        return None
    bits, gs = getattr(layer, "bits", None), getattr(layer, "group_size", None)
    if bits not in (2, 4, 8) or gs not in (32, 64, 128) or gs % (128 // bits):
        return None
    if layer.scales.dtype not in FLOAT_TYPES or layer.weight.dtype != mx.uint32:
        return None
    return bits, gs


def decode_sized(x, inds, max_pairs=MAX_PAIRS) -> bool:
    """Few enough tokens and token-expert pairs for the decode kernels."""
    N = x.size // x.shape[-1]
    return N <= MAX_TOKENS and N * inds.shape[-1] <= max_pairs


def unsupported(x, inds, gate_proj, up_proj, down_proj) -> Optional[str]:
    """Why the kernels cannot run these weights and activations (None when they can)."""
    q = [quant_params(m) for m in (gate_proj, up_proj, down_proj)]
    if None in q:
        return "weights are not affine-quantized (2/4/8 bits, group 32/64/128)"
    if q[0] != q[1]:
        return "gate_proj and up_proj are quantized differently"
    if x.dtype not in FLOAT_TYPES:
        return f"activations of type {x.dtype}"
    if gate_proj.weight.shape[-2] != down_proj.input_dims:
        return "inconsistent expert shapes"
    return None


def fused_max_pairs(bits) -> int:
    """Most token-expert pairs for which the dispatch takes the kernels, by gate/up bits.

    H100, DeepSeek-V3 layer, 8 tokens top-8 (64 pairs): 4 bits fused 1121 µs vs reference
    1246 µs; 8 bits (older launch defaults) 0.63x the reference, so 8 bits stop at 16."""
    return MAX_PAIRS if bits <= 4 else 16


def launch_config(D, I, bits_gu, bits_d, pairs=1, nw=(4, 4), rt=None, rw=None, sa=None,
                  rb=None, sb=None, ue=None, dq=None, xc=0, xs=None):
    """Warps per block, rows per warp and 16-byte chunks in flight per lane (about 8 per
    matrix row: enough to cover memory latency without spilling registers).

    Keys (all optional, for benchmarks/kernels.py --sweep): nw (warps of stage 1, stage 2),
    rt (row tiles per stage-1 block), rw (gate/up row pairs per stage-1 warp at once), sa/sb
    (chunks per lane per load stage), rb (rows per stage-2 warp), ue (experts per stage-2
    load step), dq (stage 2: 1 = one shift per 8/bits values, see kt_common.h), xc (stage 1:
    1 = x copied to float32 chunk-major first, the layout before 2026-11-26, for comparison),
    xs (stage 2: 1 = a block's warps share its rb rows and split the experts).
    Defaults: the H100 sweep's fastest at 4 bits (rw 2; rb 8, dq 1, so ue 1; xs 1 up to 8
    pairs: 105 against 112 µs for one token's call, 1423 against 1161 µs at 8 tokens); each
    stage at 8 bits (not swept) keeps rw 1, resp. rb 2, dq 0 and xs 0."""

    def stage(chunks_per_lane, cap):
        stages = math.ceil(chunks_per_lane / cap)
        return math.ceil(chunks_per_lane / stages)

    rw = rw or (2 if bits_gu <= 4 else 1)
    rb = rb or (8 if bits_d <= 4 else 2)
    dq = (1 if bits_d <= 4 else 0) if dq is None else dq
    xs = (1 if bits_d <= 4 and pairs <= 8 else 0) if xs is None else xs
    if dq not in (0, 1) or xc not in (0, 1) or xs not in (0, 1):
        raise ValueError(f"dq, xc and xs must be 0 or 1 (got {dq!r}, {xc!r}, {xs!r})")
    cpl_a = math.ceil(D // (128 // bits_gu) / 32)
    cpl_b = math.ceil(I // (128 // bits_d) / 32)
    sb = stage(cpl_b, sb or max(1, 8 // rb))
    nw_a = max(2, nw[0])  # the plan needs 64 threads
    # Row tiles per stage-1 block: enough blocks to fill the GPU, few plans to compute.
    rt = rt or max(1, math.ceil(I / (nw_a * rw)) * pairs // TARGET_BLOCKS)
    return {"nw_a": nw_a, "rt": rt, "rw": rw, "sa": stage(cpl_a, sa or max(1, 8 // rw)),
            "nw_b": max(2, nw[1]), "rb": rb, "sb": sb, "ue": ue or max(1, 8 // (rb * sb)),
            "dq": dq, "xc": xc, "xs": xs}


@lru_cache(maxsize=None)
def kernel_fn(backend: str, spec: sources.KernelSpec):
    if backend == "cpu":
        from .emulate import EmulatedKernel

        return EmulatedKernel(spec)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(
        name=spec.name,
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=sources.source(backend, spec),
        header=sources.header(backend),
    )


def shared_unsupported(shared, gate_proj, down_proj) -> Optional[str]:
    """Why a shared-expert MLP (gate_proj/up_proj/down_proj linears) cannot ride in the
    routed kernels' launches (None when it can): it must be quantized and shaped like one
    routed expert."""
    projs = [shared.get(k) for k in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None or not hasattr(p, "scales") for p in projs):
        return "shared expert not quantized"
    q = [quant_params(p) for p in projs]
    if q[0] != quant_params(gate_proj) or q[1] != q[0] or q[2] != quant_params(down_proj):
        return "shared expert quantized unlike the routed experts"
    if projs[0].weight.shape != gate_proj.weight.shape[1:] or \
            projs[1].weight.shape != gate_proj.weight.shape[1:] or \
            projs[2].weight.shape != down_proj.weight.shape[1:]:
        return "shared expert shaped unlike one routed expert"
    if projs[0].scales.dtype != gate_proj.scales.dtype or \
            projs[1].scales.dtype != gate_proj.scales.dtype or \
            projs[2].scales.dtype != down_proj.scales.dtype:
        return "shared expert's scales of another type"
    return None


@lru_cache(maxsize=256)
def launches(D, I, N, K, quant_gu, quant_d, dtype, scale_gu, scale_d, idx_dtype, config=(),
             shared=False, res=False, lead=None):
    """The static part of both kernel calls (templates, grids, outputs) for one signature,
    cached: decoding calls the same few signatures over and over. lead: the output's
    leading dims (default (N,))."""
    (bits, gs), (bits_d, gs_d) = quant_gu, quant_d
    P = N * K
    SH = int(shared)
    cfg = launch_config(D, I, bits, bits_d, pairs=P, **dict(config))
    nw, rt, rw, nw_b, rb = cfg["nw_a"], cfg["rt"], cfg["rw"], cfg["nw_b"], cfg["rb"]
    gate_up = dict(
        template=[("D", D), ("I", I), ("BITS", bits), ("GS", gs), ("NT", N), ("K", K),
                  ("NW", nw), ("RT", rt), ("RW", rw), ("SA", cfg["sa"]), ("BD", bits_d),
                  ("ST", scale_gu), ("IT", idx_dtype), ("SH", SH), ("XC", cfg["xc"]),
                  ("TK", 0 if cfg["xc"] else TYPE_KIND[dtype])],
        grid=(math.ceil(I / (nw * rt * rw)) * nw * 32, P + SH, 1),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[(P + SH * N, I), (1 + P + P * N,), (P * N,)],
        output_dtypes=[mx.float32, mx.int32, mx.float32],
    )
    down = dict(
        template=[("D", D), ("I", I), ("BITS", bits_d), ("GS", gs_d), ("NT", N), ("K", K),
                  ("NW", nw_b), ("RB", rb), ("UE", cfg["ue"]), ("SB", cfg["sb"]),
                  ("T", dtype), ("ST", scale_d), ("DQ", cfg["dq"]), ("SH", SH),
                  ("RES", int(res)), ("XS", cfg["xs"])],
        grid=(math.ceil(D / (rb if cfg["xs"] else nw_b * rb)) * nw_b * 32, 1, 1),
        threadgroup=(nw_b * 32, 1, 1),
        output_shapes=[(*((N,) if lead is None else lead), D)],
        output_dtypes=[dtype],
    )
    return bits, gate_up, down


def chunk_major(x, bits):
    """[N, D] -> [N, VPC/4, D/VPC, 4] float32 (VPC = 128/bits values per 16-byte chunk): the
    layout in which a warp's lanes read their chunks' inputs with adjacent float4 loads."""
    N, D = x.shape
    vpc = 128 // bits
    return x.reshape(N, D // vpc, vpc // 4, 4).transpose(0, 2, 1, 3).astype(mx.float32)


def _arrays(layer):
    return [layer.weight, layer.scales, layer.biases]


def fused_stages(x, inds, scores, gate_proj, up_proj, down_proj, backend, shared=None,
                 residual=None, **config):
    """(h, plan, uw) of stage 1 and y of stage 2, for x [..., D], inds/scores [..., K]; with
    `shared` (an MLP that shared_unsupported accepts) y includes shared(x), with `residual`
    [..., D] y includes it too. y: [..., D]."""
    # The kernels read x, inds, scores and residual as flat rows: no reshapes around the
    # launches (each one more graph node for MLX's host to build and walk at every step).
    D, K = x.shape[-1], inds.shape[-1]
    N = x.size // D
    idx = inds if inds.dtype in (mx.int32, mx.uint32) else inds.astype(mx.int32)
    sc = scores if scores.dtype == mx.float32 else scores.astype(mx.float32)
    bits, gate_up, down = launches(
        D, gate_proj.weight.shape[-2], N, K, quant_params(gate_proj), quant_params(down_proj),
        x.dtype, gate_proj.scales.dtype, down_proj.scales.dtype, idx.dtype,
        tuple(sorted(config.items())), shared is not None, residual is not None, x.shape[:-1])
    # Without a shared expert the routed arrays stand in for its inputs (never read).
    sh = shared if shared is not None else dict(gate_proj=gate_proj, up_proj=up_proj,
                                                down_proj=down_proj)
    h, plan, uw = kernel_fn(backend, sources.GATE_UP)(
        inputs=[chunk_major(x.reshape(N, D), bits) if config.get("xc") else x, idx, sc,
                *_arrays(gate_proj), *_arrays(up_proj),
                *_arrays(sh["gate_proj"]), *_arrays(sh["up_proj"])],
        **gate_up)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.astype(x.dtype)
    (y,) = kernel_fn(backend, sources.DOWN)(
        inputs=[h, plan, uw, *_arrays(down_proj), *_arrays(sh["down_proj"]),
                x if residual is None else residual], **down)
    return (h, plan, uw), y


def fused_routed_experts(x, inds, scores, gate_proj, up_proj, down_proj, backend, shared=None,
                         residual=None, **config):
    """sum_k scores[..., k] * expert_{inds[..., k]}(x) (+ shared(x)) (+ residual) with the
    two kernels."""
    # x: [..., D], inds/scores: [..., K], residual: [..., D] -> [..., D] (x.dtype)
    return fused_stages(x, inds, scores, gate_proj, up_proj, down_proj, backend, shared,
                        residual, **config)[1]
