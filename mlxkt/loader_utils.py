"""Small helpers shared by the model and MTP loaders."""

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def cast_floats(module: nn.Module, dtype: mx.Dtype, keep: Optional[Callable] = None) -> None:
    """Cast floating parameters to dtype, except those `keep(path)` says to leave alone."""
    keep = keep or (lambda k: True)
    params = [
        (k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and keep(k) else v)
        for k, v in tree_flatten(module.parameters())
    ]
    module.update(tree_unflatten(params))
