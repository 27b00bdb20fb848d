"""nn.QuantizedLinear whose decode-sized calls (1 to 8 rows) run mlxkt's GEMV kernel.

Same parameters (names and arrays) as the layer it wraps; larger batches, the CPU and
MLXKT_KERNELS=0 keep MLX's quantized matmul (mlxkt.kernels.dispatch.quantized_linear).
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
