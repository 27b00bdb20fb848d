"""Linears that read the same input, computed as one: their rows stacked into one matrix.

MLA's q_a_proj (q_proj without a q LoRA) and kv_a_proj_with_mqa both project a layer's
normed input. At decode each is a GEMV launch, and the small ones are bound by latency, not bytes: on an H100 one launch for
q_a + kv_a (2112 x 7168) took 12.8 µs against 11.5 + 9.0 µs for the two
(benchmarks/gemv.py, 2026-11-26). `fuse_rows` stacks the rows once; the original layers
keep their names and now hold views of the stacked arrays, so no weight is held twice and
the checkpoint's parameter names are unchanged.

The owner module keeps the stacked linear as a plain attribute (not a child module, so it
is not a second set of parameters) and calls `split_call`.
"""

import contextlib
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..kernels.qgemv import linear_like
from .qlinear import KernelQuantizedLinear, norm_linear

ARRAYS = ("weight", "scales", "biases")


def concat_linears(a, b):
    """One linear computing [a(x), b(x)] (rows of a, then b), or None where a and b differ
    in kind, quantization or bias. a and b keep their own arrays (see fuse_rows)."""
    if any("bias" in m for m in (a, b)) or type(a) is not type(b):
        return None
    if isinstance(a, nn.QuantizedLinear):
        if (a.bits, a.group_size, getattr(a, "mode", "affine")) != (
                b.bits, b.group_size, getattr(b, "mode", "affine")):
            return None
        arrays = {k: mx.concatenate([a[k], b[k]]) for k in ARRAYS if k in a}
        return linear_like(a, type(a), **arrays)
    if isinstance(a, nn.Linear):
        fused = nn.Linear(1, 1, bias=False)
        fused.weight = mx.concatenate([a.weight, b.weight])
        return fused
    return None


def fuse_rows(a: nn.Module, b: nn.Module) -> Optional[nn.Module]:
    """One linear computing [a(x), b(x)], with a's and b's arrays turned into views of its
    own; None (nothing changed) unless both are KernelQuantizedLinear layers of the same
    quantization without bias."""
    if type(a) is not KernelQuantizedLinear or type(b) is not KernelQuantizedLinear:
        return None
    if a.scales.dtype != b.scales.dtype or a.weight.shape[1] != b.weight.shape[1]:
        return None
    fused = concat_linears(a, b)
    if fused is None:
        return None
    n = a.weight.shape[0]
    for k in ARRAYS:  # slices of an evaluated array share its buffer
        setattr(a, k, fused[k][:n])
        setattr(b, k, fused[k][n:])
    return fused


def split_call(fused: nn.Module, x: mx.array, n: int, norm=None):
    """(first n outputs, the rest) of fused(norm(x)), the norm folded into the launch;
    n < 0 counts from the end."""
    # x: [..., D] -> [..., n], [..., O - n]
    return tuple(mx.split(norm_linear(fused, x, norm), [n], axis=-1))


def fuse_shared_inputs(model: nn.Module) -> int:
    """Stack the projections that share an input in every module that names them
    (`fusable_rows()`: MLA's down-projections); returns how many stacked linears were made.
    (A SwiGLU's gate/up could follow; the bench variant fused-proj measures that.)"""
    made = []
    for _, m in model.named_modules():
        pair = m.fusable_rows() if hasattr(m, "fusable_rows") else None
        fused = fuse_rows(*pair) if pair else None
        if fused is not None:
            m.__dict__["fused_rows"] = fused  # a plain attribute: not a child module
            made.append(fused)
    return len(made)


def unfuse(model: nn.Module) -> list:
    """Back to one launch per projection (the same arrays): the bench's before. Returns
    what `refuse` needs to undo it."""
    return [(m, m.__dict__.pop("fused_rows")) for _, m in model.named_modules()
            if "fused_rows" in m.__dict__]


@contextlib.contextmanager
def unfused(model: nn.Module):
    """The projections called one by one inside the block (the bench's per-module
    breakdown, whose stand-ins would not see a stacked call), stacked again after it."""
    saved = unfuse(model)
    try:
        yield
    finally:
        for m, fused in saved:
            m.__dict__["fused_rows"] = fused
