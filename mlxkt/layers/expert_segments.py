"""Routed experts for prefill-sized batches: one dense quantized matmul per expert.

MLX's gather_qmm (the reference path) has no tensor-core path for large token counts on CUDA,
while mx.quantized_matmul on a contiguous [rows, D] block uses one. So for many (token, expert)
pairs the pairs are sorted by expert and each touched expert runs three plain quantized
matmuls on its own slice. Learning the slice sizes takes one host sync per MoE layer: fine in
prefill, never wanted in decode, which stays below SEGMENT_MIN_PAIRS (H100, DeepSeek-V3,
512-token prefill: 6.2x the gather_qmm engine). MLXKT_SEGMENTS=0 turns the path off, =1 on
(also on the CPU and Apple GPUs, where it is off by default: 0.91-0.93x on the
project's CPU, never measured on Metal).
"""

import os

import mlx.core as mx
import mlx.nn as nn

from ..kernels.dispatch import gpu_backend

ENV = "MLXKT_SEGMENTS"
SEGMENT_MIN_PAIRS = 256  # fewer (token, expert) pairs: decode-sized, the gather path is right


def _env_choice():
    """True / False when MLXKT_SEGMENTS forces the path on / off, None for automatic."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "false", "off", "no"):
        return False
    if v in ("1", "true", "on", "yes"):
        return True
    return None


def _affine_quantized(layer) -> bool:
    """An affine-quantized switch layer with no bias, which _qmm can run one expert at a time."""
    return (
        layer.get("scales") is not None
        and layer.get("biases") is not None
        and getattr(layer, "mode", "affine") == "affine"
        and getattr(layer, "global_scale", None) is None
        and "bias" not in layer
    )


def use_segments(x, inds, gate_proj, up_proj=None, down_proj=None) -> bool:
    """Whether segmented_experts should run this call (quantized weights, a prefill-sized
    batch, a GPU or MLXKT_SEGMENTS=1)."""
    # x: [..., D], inds: [..., K]
    if inds.size < SEGMENT_MIN_PAIRS:  # every decode step stops here
        return False
    forced = _env_choice()
    if forced is False:
        return False
    projs = [p for p in (gate_proj, up_proj, down_proj) if p is not None]
    if not all(_affine_quantized(p) for p in projs):
        return False
    # CUDA only: measured there, never on an Apple GPU.
    return forced or gpu_backend() == "cuda"


def segmented_experts(x, inds, scores, gate_proj, up_proj, down_proj):
    """sum_k scores[..., k] * expert_{inds[..., k]}(x), expert by expert on sorted pairs.

    Returns None when the per-expert counts cannot be read (inside mx.compile or vmap, which
    forbid the host sync); the caller then takes the gather path."""
    # x: [..., D], inds/scores: [..., K] -> [..., D] (x.dtype)
    lead, K, D = inds.shape[:-1], inds.shape[-1], x.shape[-1]
    E = gate_proj.weight.shape[0]
    flat = inds.reshape(-1)  # [P], P = N*K pairs in (token, k) order
    order = mx.argsort(flat)  # [P], pairs grouped by expert
    try:
        counts = (flat[:, None] == mx.arange(E)[None]).sum(axis=0).tolist()  # host sync, [E]
    except ValueError:  # "eval during a function transformation": no sync possible here
        return None
    pad_rows = gpu_backend() == "cuda"
    xs = x.reshape(-1, D)[order // K]  # [P, D] grouped by expert
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        xe = xs[start : start + c]  # [c, D]
        pad = _row_tile(c) - c if pad_rows else 0
        if pad:  # keep MLX CUDA's qmm row tiles full (see _row_tile)
            xe = mx.concatenate([xe, mx.zeros((pad, D), xe.dtype)])
        h = nn.silu(_qmm(xe, gate_proj, e)) * _qmm(xe, up_proj, e)  # [c + pad, I]
        outs.append(_qmm(h, down_proj, e)[:c])  # [c, D]
        start += c
    y = mx.concatenate(outs)[mx.argsort(order)]  # [P, D], back in (token, k) order
    # Weighted sum in float32 (as the reference path does), back to the input type.
    w = scores.reshape(-1, K, 1).astype(mx.float32)
    return (y.reshape(-1, K, D) * w).sum(axis=1).astype(x.dtype).reshape(*lead, D)


def _row_tile(m: int) -> int:
    """Rows rounded up to MLX CUDA qmm_sm80's row tile (a power of two from 16 to 64, then
    multiples of 64). A prefill chunk of 511 tokens x top-8 crashed MLX 0.32.4 CUDA with an
    illegal memory access (suspected partial row tile); padded rows cost little here."""
    if m <= 64:
        return max(16, 1 << (m - 1).bit_length())
    return -(-m // 64) * 64


def _qmm(x, layer, e):
    # x: [M, in] -> [M, out] with expert e's weights (layer.weight: [E, out, in] packed)
    return mx.quantized_matmul(x, layer.weight[e], layer.scales[e], layer.biases[e],
                               transpose=True, group_size=layer.group_size, bits=layer.bits)
