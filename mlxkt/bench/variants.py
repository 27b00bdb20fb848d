"""Experimental engine variants, applied to a loaded mlxkt model at run time so they can be
measured against the engine as it is, in the same run. Nothing here changes the engine's
files; what pays off moves into the engine.

- compiled:      decode through the engine's compiled layers (layers/decode_compile.py,
                 off by default until measured on a GPU; MLXKT_COMPILE=1 turns it on).
- eager:         the compiled layers forced off (the "before" when MLXKT_COMPILE=1).
- mla-gemm:      the decode attention over the latent cache as three GEMMs (all heads as
                 rows) instead of a score matmul + SDPA with the rope scores as the mask.
- moe-segments:  prefill: tokens sorted by expert, then one dense quantized matmul per
                 expert on its contiguous slice (MLX's tensor-core qmm) instead of
                 gather_qmm; one host sync per MoE layer to learn the slice sizes.
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..layers.decode_compile import set_compiled_decode
from ..layers.mla import ABSORB_MAX_L
from .measure import Engine

def _mla_gemm(attn, q, q_pe, k, v, k_pe, mask=None):
    """Absorbed MLA attention as three GEMMs over the shared latent: all heads' queries form
    the rows, so the cache is read once per GEMM instead of once per head."""
    # q: [B, H, L, r], q_pe: [B, H, L, rope] (pre-scaled), k = v = latent / k_pe: [B, 1, S, *]
    B, H, L, r = q.shape
    if k.shape[1] != 1 or L > ABSORB_MAX_L:  # the expanded prefill path
        return type(attn).attend(attn, q, q_pe, k, v, k_pe, mask)
    ql = q.reshape(B, 1, H * L, r) * attn.scale
    qp = q_pe.reshape(B, 1, H * L, -1)
    scores = ql @ k.swapaxes(-1, -2) + qp @ k_pe.swapaxes(-1, -2)  # [B, 1, H*L, S]
    if mask is not None:
        scores = scores.reshape(B, H, L, -1)
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        scores = scores.reshape(B, 1, H * L, -1)
    p = mx.softmax(scores, axis=-1, precise=True)
    return (p @ v).reshape(B, H, L, r)


def _gemm_attention(engine: Engine):
    for layer in engine.model.model.layers:
        layer.self_attn.attend = partial(_mla_gemm, layer.self_attn)


class _SegmentedExperts(nn.Module):
    """Routed experts with per-expert dense quantized matmuls for large token counts."""

    def __init__(self, inner, min_pairs: int):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "min_pairs", min_pairs)

    def __call__(self, x, inds, scores):
        # x: [..., D], inds/scores: [..., K] -> [..., D]
        if inds.size < self.min_pairs or not hasattr(self.inner.gate_proj, "scales"):
            return self.inner(x, inds, scores)
        m = self.inner
        lead, K, D = inds.shape[:-1], inds.shape[-1], x.shape[-1]
        E = m.gate_proj.weight.shape[0]
        flat = inds.reshape(-1)
        order = mx.argsort(flat)
        counts = (flat[:, None] == mx.arange(E)[None]).sum(axis=0).tolist()  # host sync
        xs = x.reshape(-1, D)[order // K]  # [N*K, D] grouped by expert
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            xe = xs[start : start + c]
            pad = _row_tile(c) - c
            if pad:  # keep MLX CUDA's qmm row tiles full (see _row_tile)
                xe = mx.concatenate([xe, mx.zeros((pad, D), xe.dtype)])
            g = _qmm(xe, m.gate_proj, e)
            u = _qmm(xe, m.up_proj, e)
            outs.append(_qmm(nn.silu(g) * u, m.down_proj, e)[:c])
            start += c
        y = mx.concatenate(outs)[mx.argsort(order)]  # back to (token, k) order
        w = scores.reshape(-1, K, 1).astype(y.dtype)
        return (y.reshape(-1, K, D) * w).sum(axis=1).reshape(*lead, D)


def _row_tile(m: int) -> int:
    """Rows rounded up to MLX CUDA qmm_sm80's row tile (a power of two from 16 to 64, then
    multiples of 64). A prefill chunk of 511 tokens x top-8 crashed MLX 0.32.4 CUDA with an
    illegal memory access (suspected partial row tile); padded rows cost little here."""
    if m <= 64:
        return max(16, 1 << (m - 1).bit_length())
    return -(-m // 64) * 64


def _qmm(x, layer, e):
    return mx.quantized_matmul(x, layer.weight[e], layer.scales[e], layer.biases[e],
                               transpose=True, group_size=layer.group_size, bits=layer.bits)


def _segments(engine: Engine, min_pairs: int = 256):
    for layer in engine.model.model.layers:
        mlp = layer.mlp
        if "switch_mlp" in mlp:
            mlp.switch_mlp = _SegmentedExperts(mlp.switch_mlp, min_pairs)


VARIANTS = {
    "compiled": lambda e: set_compiled_decode(e.model, True),
    "eager": lambda e: set_compiled_decode(e.model, False),
    "mla-gemm": _gemm_attention,
    "moe-segments": _segments,
}


def apply_variant(engine: Engine, name: str) -> None:
    """Apply one variant, or several joined by '+' (e.g. compiled+mla-gemm)."""
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ValueError(f"unknown variant {part!r} (known: {', '.join(sorted(VARIANTS))})")
        VARIANTS[part](engine)
    engine.name = f"mlxkt+{name}"
    engine.variant = name
    engine.decode_only = all(p != "moe-segments" for p in name.split("+"))
    engine.notes.append(f"variant {name}")
