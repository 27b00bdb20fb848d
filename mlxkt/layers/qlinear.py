"""nn.QuantizedLinear whose decode-sized calls (1 to 8 rows) run mlxkt's GEMV kernel.

Same parameters (names and arrays) as the layer it wraps; larger batches, the CPU and
MLXKT_KERNELS=0 keep MLX's quantized matmul (mlxkt.kernels.dispatch.quantized_linear).
norm_linear lets a caller hand the RMSNorm before a linear and the residual after it to the
kernel, which folds both into its launch.
"""

import mlx.nn as nn

from ..kernels.dispatch import quantized_linear
from ..kernels.qgemv import linear_like


class KernelQuantizedLinear(nn.QuantizedLinear):
    @classmethod
    def wrap(cls, layer: nn.QuantizedLinear) -> "KernelQuantizedLinear":
        return linear_like(layer, cls)

    def __call__(self, x):
        # x: [..., in] -> [..., out]
        return quantized_linear(self, x)


def norm_linear(layer, x, norm=None, residual=None):
    """layer(norm(x)) + residual (norm and residual optional): in one GEMV launch when layer
    is a KernelQuantizedLinear and the kernel runs; any other layer computes it in steps."""
    # x: [..., in], residual: [..., out] -> [..., out]
    if isinstance(layer, KernelQuantizedLinear):
        return quantized_linear(layer, x, norm, residual)
    y = layer(x if norm is None else norm(x))
    return y if residual is None else residual + y
