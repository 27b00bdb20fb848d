"""The routed-expert MLP in plain MLX ops: the reference every kernel is checked against.

y = sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)), with e = inds[..., k], w = scores[..., k].
gate/up/down are mlx-lm SwitchLinear or QuantizedSwitchLinear modules ([E, out, in] stacks).
"""

import mlx.core as mx
import mlx.nn as nn

# Above this many (token, expert) pairs, sort by expert so gather_mm reads each expert once.
SORT_THRESHOLD = 64


def routed_experts_reference(x, inds, scores, gate_proj, up_proj, down_proj):
    # x: [..., D], inds/scores: [..., K] -> [..., D] (x.dtype)
    lead, K = inds.shape[:-1], inds.shape[-1]
    D = x.shape[-1]
    idx = inds.reshape(-1, K)  # [N, K]

    def mlp(xs, ix, sorted_indices=False):
        g = gate_proj(xs, ix, sorted_indices=sorted_indices)
        u = up_proj(xs, ix, sorted_indices=sorted_indices)
        return down_proj(nn.silu(g) * u, ix, sorted_indices=sorted_indices)

    if idx.size >= SORT_THRESHOLD:
        flat = idx.flatten()
        order = mx.argsort(flat)
        xs = x.reshape(-1, 1, D)[order // K]  # [N*K, 1, D], grouped by expert
        y = mlp(xs, flat[order], sorted_indices=True)  # [N*K, 1, D]
        y = y[mx.argsort(order)]  # back to (token, k) order
    else:
        y = mlp(x.reshape(-1, 1, 1, D), idx)  # [N, K, 1, D]
    y = y.reshape(-1, K, D)
    # Weighted sum in float32 (as mlx-lm's DeepSeek blocks do), back to the input type.
    w = scores.reshape(-1, K, 1).astype(mx.float32)
    return (y * w).sum(axis=1).astype(x.dtype).reshape(*lead, D)
