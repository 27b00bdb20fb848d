"""The routed-expert MLP of a MoE layer: y = sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)).

Parameters keep mlx-lm's names (`switch_mlp.{gate,up,down}_proj.weight`, stacked [E, out, in])
so mlx-lm conversions load unchanged. The call goes through mlxkt.kernels: fused Metal/CUDA
kernels on a GPU for decode-sized batches, the plain-MLX reference otherwise.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from ..kernels.dispatch import routed_experts


class RoutedExperts(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.up_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden_dims, dims, num_experts, bias=False)

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        # x: [..., D], inds/scores: [..., K] -> [..., D]
        return routed_experts(x, inds, scores, self.gate_proj, self.up_proj, self.down_proj)

    @classmethod
    def wrap(cls, gate_proj, up_proj, down_proj) -> "RoutedExperts":
        """Routed experts around existing projections (e.g. an mlx-lm SwitchGLU's), no copy."""
        experts = cls.__new__(cls)
        nn.Module.__init__(experts)
        experts.gate_proj, experts.up_proj, experts.down_proj = gate_proj, up_proj, down_proj
        return experts
