"""The routed-expert MLP of a MoE layer: y = sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)).

Parameters keep mlx-lm's names (`switch_mlp.{gate,up,down}_proj.weight`, stacked [E, out, in])
so mlx-lm conversions load unchanged. This file is the plain-MLX reference path.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

# Above this many (token, expert) pairs, sort by expert so gather_mm reads each expert once.
SORT_THRESHOLD = 64


class RoutedExperts(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.up_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden_dims, dims, num_experts, bias=False)

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        # x: [..., D], inds/scores: [..., K] -> [..., D]
        lead, K = inds.shape[:-1], inds.shape[-1]
        D = x.shape[-1]
        idx = inds.reshape(-1, K)  # [N, K]
        if idx.size >= SORT_THRESHOLD:
            flat = idx.flatten()
            order = mx.argsort(flat)
            xs = x.reshape(-1, 1, D)[order // K]  # [N*K, 1, D], grouped by expert
            y = self._mlp(xs, flat[order], sorted_indices=True)  # [N*K, 1, D]
            y = y[mx.argsort(order)]  # back to (token, k) order
        else:
            y = self._mlp(x.reshape(-1, 1, 1, D), idx)  # [N, K, 1, D]
        y = y.reshape(-1, K, D)
        w = scores.reshape(-1, K, 1).astype(y.dtype)
        return (y * w).sum(axis=1).reshape(*lead, D)

    def _mlp(self, x, idx, sorted_indices=False):
        g = self.gate_proj(x, idx, sorted_indices=sorted_indices)
        u = self.up_proj(x, idx, sorted_indices=sorted_indices)
        return self.down_proj(nn.silu(g) * u, idx, sorted_indices=sorted_indices)
