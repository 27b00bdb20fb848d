"""The routed-expert MLP of a MoE layer: y = sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)).

Parameters keep mlx-lm's names (`switch_mlp.{gate,up,down}_proj.weight`, stacked [E, out, in])
so mlx-lm conversions load unchanged. Three paths, chosen per call:
  - prefill-sized batches of quantized experts on a GPU: one dense quantized matmul per
    touched expert (expert_segments.py; MLXKT_SEGMENTS=0 turns it off, =1 on, also on CPU);
  - otherwise mlxkt.kernels: fused Metal/CUDA kernels on a GPU for decode-sized batches,
    the plain-MLX reference (gather_qmm) for the rest.
The block's shared expert, when given, is added to the result; the fused kernels compute it
in their own launches when it has one routed expert's shape (DeepSeek-V3/R1), and add the
layer's residual too when the caller passes it (one elementwise launch fewer per layer).
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from ..kernels.dispatch import routed_experts
from .expert_segments import segmented_experts, use_segments


class RoutedExperts(nn.Module):
    # None: segmented prefill when use_segments says so; False: never (a plain attribute, not
    # a parameter; mlxkt.bench's "no-segments" variant sets it on one engine only).
    segments: Optional[bool] = None
    # False: the shared expert never rides in the kernels' launches ("no-fused-shared").
    fuse_shared: bool = True
    # Launch keys for the fused kernels (moe.launch_config), e.g. from a bench variant.
    launch: Optional[dict] = None

    def __init__(self, dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.up_proj = SwitchLinear(dims, hidden_dims, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden_dims, dims, num_experts, bias=False)

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array,
                 shared: Optional[nn.Module] = None, residual: Optional[mx.array] = None):
        """The routed experts' weighted sum, plus shared(x) when the block has a shared
        expert and plus `residual` when given (on a GPU at decode, both computed inside the
        routed kernels' launches)."""
        # x: [..., D], inds/scores: [..., K], residual: [..., D] -> [..., D]
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        if self.segments is not False and use_segments(x, inds, *projs):
            y = segmented_experts(x, inds, scores, *projs)  # None inside mx.compile
            if y is not None:
                y = y if shared is None else y + shared(x)
                return y if residual is None else residual + y
        return routed_experts(x, inds, scores, *projs, shared=shared,
                              fuse_shared=self.fuse_shared, residual=residual, config=self.launch)

    @classmethod
    def wrap(cls, gate_proj, up_proj, down_proj) -> "RoutedExperts":
        """Routed experts around existing projections (e.g. an mlx-lm SwitchGLU's), no copy."""
        experts = cls.__new__(cls)
        nn.Module.__init__(experts)
        experts.gate_proj, experts.up_proj, experts.down_proj = gate_proj, up_proj, down_proj
        return experts
