"""nn.QuantizedLinear whose decode-sized calls (1 to 8 rows) run mlxkt's GEMV kernel.

Same parameters (names and arrays) as the layer it wraps; larger batches, the CPU and
MLXKT_KERNELS=0 keep MLX's quantized matmul (mlxkt.kernels.dispatch.quantized_linear).
"""

import mlx.nn as nn

from ..kernels.dispatch import quantized_linear


class KernelQuantizedLinear(nn.QuantizedLinear):
    @classmethod
    def wrap(cls, layer: nn.QuantizedLinear) -> "KernelQuantizedLinear":
        kw = {"mode": layer.mode} if hasattr(layer, "mode") else {}
        new = cls(layer.group_size, 1, bias=False, group_size=layer.group_size, bits=layer.bits, **kw)
        for name, value in layer.items():  # weight, scales, biases, bias
            setattr(new, name, value)
        new.freeze()
        return new

    def __call__(self, x):
        # x: [..., in] -> [..., out]
        return quantized_linear(self, x)
