"""Absorbed MLA decode attention with the query scale and the rope scores inside the score GEMM.

MLX's SDPA fallback for a 512-wide latent head (all it has on CUDA) runs a multiply for the
scale, the score GEMM, an add for the mask that carries the rope scores, softmax and the
value GEMM. `mx.addmm(pe, q, k^T, alpha=scale)` gives scale * q k^T + pe from one cuBLASLt
call (its epilogue reads pe), two kernels fewer per layer and decode step. All heads form
the GEMM's rows (the latent cache is shared by the heads: one [H*L, S] product).
"""

from typing import Optional

import mlx.core as mx

from ..device import env_switch
from ..kernels.dispatch import gpu_backend

ENV = "MLXKT_ADDMM_SCORES"  # 1/0: always / never; unset: on CUDA


def enabled(forced: Optional[bool] = None) -> bool:
    on = env_switch(ENV) if forced is None else forced
    return gpu_backend() == "cuda" if on is None else on


def addmm_attention(q, q_pe, k, v, k_pe, scale: float, mask=None, valid=None):
    """softmax(scale q k^T + q_pe k_pe^T [masked]) v over a latent cache shared by the heads.
    valid: only the first `valid` keys count (the rest pad, see key_padding.py)."""
    # q: [B, H, L, r], q_pe: [B, H, L, rope] (pre-scaled), k = v: [B, 1, S, r],
    # k_pe: [B, 1, S, rope], mask: broadcastable to [B, H, L, S] (True: attend)
    B, H, L, r = q.shape
    rows = lambda a: a.reshape(B, 1, H * L, a.shape[-1])  # noqa: E731
    pe = rows(q_pe) @ k_pe.swapaxes(-1, -2)  # [B, 1, H*L, S]
    if valid is not None:
        pe[..., valid:] = mx.array(-float("inf"), pe.dtype)
    if mask is not None:
        neg = mx.array(mx.finfo(pe.dtype).min, pe.dtype)
        pe = rows(mx.where(mask, pe.reshape(B, H, L, -1), neg))
    scores = mx.addmm(pe, rows(q), k.swapaxes(-1, -2), alpha=scale)
    out = mx.softmax(scores, axis=-1, precise=True) @ v  # [B, 1, H*L, r]
    return out.reshape(B, H, L, r)
