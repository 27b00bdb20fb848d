"""Splitting MLA's kv_b_proj for absorbed attention (mlx.core only: the converter imports it
without pulling in mlx-lm)."""

import mlx.core as mx


def split_kv_b(w: mx.array, num_heads: int, qk_nope_head_dim: int):
    """kv_b_proj.weight [H*(nope+v), r] -> embed_q [H, r, nope], unembed_out [H, v, r]."""
    w = w.reshape(num_heads, -1, w.shape[-1])  # [H, nope+v, r]
    embed_q = mx.contiguous(w[:, :qk_nope_head_dim, :].swapaxes(-1, -2))
    unembed_out = mx.contiguous(w[:, qk_nope_head_dim:, :])
    return embed_q, unembed_out
