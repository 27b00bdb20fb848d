"""Small helpers shared by the model and MTP loaders."""

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .kernels.dispatch import gpu_backend


def cast_floats(module: nn.Module, dtype: mx.Dtype, keep: Optional[Callable] = None) -> None:
    """Cast floating parameters to dtype, except those `keep(path)` says to leave alone."""
    keep = keep or (lambda k: True)
    params = [
        (k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and keep(k) else v)
        for k, v in tree_flatten(module.parameters())
    ]
    module.update(tree_unflatten(params))


def mlx_cuda_one_group_bug() -> bool:
    """MLX 0.32.4's CUDA quantized matmul is wrong for rows of a single quantization group
    (64 inputs at group 64) at 2-16 tokens (every output off) and has no kernel for more
    ("No implementation for problem shape"); 1 token is right."""
    return gpu_backend() == "cuda"


def dense_one_group_layers(model: nn.Module) -> int:
    """Dequantize every affine-quantized layer whose rows are one group (QuantizedLinear,
    QuantizedMultiLinear), so MLX's CUDA bug above cannot hit it. Only small models have such
    layers (e.g. kv LoRA 64), so the extra bytes are few. Returns how many were replaced."""
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    swaps = []
    for path, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, QuantizedMultiLinear)):
            continue
        if getattr(m, "mode", "affine") != "affine" or m.weight.shape[-1] * 32 // m.bits != m.group_size:
            continue
        dtype = m.scales.dtype  # affine scales carry the float dtype
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size,
                          bits=m.bits).astype(dtype)
        if isinstance(m, QuantizedMultiLinear):
            dense = MultiLinear(w.shape[-1], w.shape[-2], w.shape[0])
        else:
            dense = nn.Linear(w.shape[-1], w.shape[-2], bias="bias" in m)
            if "bias" in m:
                dense.bias = m.bias
        dense.weight = w
        swaps.append((path, dense))
    swap_modules(model, swaps)
    return len(swaps)


def swap_modules(model: nn.Module, swaps) -> None:
    """Put each (dotted path, module) in place of the module at that path."""
    for path, new in swaps:
        parent_path, _, name = path.rpartition(".")
        parent = model
        for part in parent_path.split(".") if parent_path else []:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        if isinstance(parent, list):
            parent[int(name)] = new
        else:
            setattr(parent, name, new)


def eval_constants(model: nn.Module) -> int:
    """Evaluate the arrays modules hold outside their parameters (e.g. mlx-lm's YaRN
    `_freqs`, built lazily in __init__). A compiled decode step traced while such an array
    is still unevaluated bakes its whole graph into the trace and recomputes it on every call:
    on an H200 that was 3 extra kernels per layer and token (2 aranges and a power). -> count."""
    # Module keeps arrays in its dict; parameters() leaves out the keys starting with "_".
    arrays = [v for m in model.modules() for k, v in m.items()
              if k.startswith("_") and isinstance(v, mx.array)]
    mx.eval(arrays)
    return len(arrays)
