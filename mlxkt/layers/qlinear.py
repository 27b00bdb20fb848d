"""Quantized linears whose decode-sized calls (1 to 8 rows) run mlxkt's GEMV kernels.

Same parameters (names and arrays) as the layers they wrap; larger batches, the CPU and
MLXKT_KERNELS=0 keep MLX's quantized matmul (mlxkt.kernels.dispatch). norm_linear lets a
caller hand the RMSNorm before a linear and the residual after it to the kernel, which
folds both into its launch.
"""

import math
from typing import Optional

import mlx.nn as nn
from mlx_lm.models.mla import QuantizedMultiLinear

from ..kernels.dispatch import multi_linear, quantized_linear
from ..kernels.qgemv import linear_like


class KernelQuantizedLinear(nn.QuantizedLinear):
    # True: rows of few pieces (q_b_proj) take the lanes kernel (kernels/qgemv_lanes.py);
    # else the block-per-row one, faster there on an H100 (a plain attribute, not a
    # parameter: the bench's variant lanes-rows sets it).
    lanes: Optional[bool] = None

    @classmethod
    def wrap(cls, layer: nn.QuantizedLinear) -> "KernelQuantizedLinear":
        return linear_like(layer, cls)

    def __call__(self, x):
        # x: [..., in] -> [..., out]
        return quantized_linear(self, x)


class KernelQuantizedMultiLinear(QuantizedMultiLinear):
    """mlx-lm's per-head quantized linear (MLA's embed_q / unembed_out): one sequence's
    decode-sized calls run the lanes kernel, all heads in one launch."""

    lanes: Optional[bool] = None  # False: MLX's batched quantized matmul always

    @classmethod
    def wrap(cls, layer: QuantizedMultiLinear) -> "KernelQuantizedMultiLinear":
        return multi_like(layer, cls)

    def unwrap(self) -> QuantizedMultiLinear:
        return multi_like(self, QuantizedMultiLinear)

    def __call__(self, x, transpose=True, shape=None):
        # x: [H, L, in] -> [H, L, out] (the kernel's case); other shapes as MLX computes them;
        # shape: see dispatch.multi_linear
        return multi_linear(self, x, transpose, shape)


def multi_like(layer, cls):
    """A `cls` with layer's arrays (no copies) and quantization, built without new weights."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in layer.items():  # weight, scales, biases
        setattr(new, name, value)
    new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
    new.freeze()
    return new


def heads_linear(layer, x, shape):
    """A per-head linear (MLA's embed_q / unembed_out, weight [H, O, in]) of x holding
    [H, L, in] in order, as `shape` (one None: whatever that leaves): where the lanes kernel
    runs it declares that shape, so neither side makes a reshape node (MLX's host works on
    every node of a step)."""
    H, O = layer.weight.shape[:2]
    known = math.prod(d for d in shape if d is not None)
    shape = tuple(x.size // x.shape[-1] * O // known if d is None else d for d in shape)
    if isinstance(layer, KernelQuantizedMultiLinear):
        return layer(x, shape=shape)
    if x.ndim != 3 or x.shape[0] != H:  # MLX makes a node for any reshape
        x = x.reshape(H, -1, x.shape[-1])
    return layer(x).reshape(shape)


def norm_linear(layer, x, norm=None, residual=None):
    """layer(norm(x)) + residual (norm and residual optional): in one GEMV launch when layer
    is a KernelQuantizedLinear and the kernel runs; any other layer computes it in steps."""
    # x: [..., in], residual: [..., out] -> [..., out]
    if isinstance(layer, KernelQuantizedLinear):
        return quantized_linear(layer, x, norm, residual)
    y = layer(x if norm is None else norm(x))
    return y if residual is None else residual + y
