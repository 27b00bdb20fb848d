"""Run-time choice between the fused kernels and the plain-MLX reference.

Apple GPU -> Metal kernels, NVIDIA GPU -> CUDA kernels. The CPU, unsupported weights, shape
or dtype, or a kernel that fails to build or to match the reference -> the reference, with
one warning per cause. Batches beyond decode size (prefill) take the reference silently: the
kernels are for 1 to a few tokens. MLXKT_KERNELS=0 forces the reference.
"""

import warnings
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from ..device import env_switch
from .moe import (MAX_TOKENS, decode_sized, fused_max_pairs, fused_routed_experts, quant_params,
                  shared_unsupported, unsupported)
from .reference import routed_experts_reference

ENV = "MLXKT_KERNELS"
GEMV_ENV = "MLXKT_GEMV"  # dense quantized linears through the GEMV kernel (see gemv_enabled)


class KernelFallbackWarning(RuntimeWarning):
    """A custom kernel could not be used; the reference path runs instead."""


def kernels_enabled() -> bool:
    return env_switch(ENV) is not False


def gemv_enabled(backend: Optional[str]) -> bool:
    """Dense linears through the GEMV kernel: MLXKT_GEMV=1/0, else on CUDA only (measured
    there: decode 1.07-1.32x on an H200; Metal's qmv was never compared on a Mac)."""
    forced = env_switch(GEMV_ENV)
    return backend == "cuda" if forced is None else forced and backend is not None


def gpu_backend() -> Optional[str]:
    """"metal" or "cuda" when MLX computes on that GPU by default, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def kernel_backend() -> Optional[str]:
    """The backend whose kernels routed_experts would use now (None: the reference)."""
    return gpu_backend() if kernels_enabled() else None


def _warn(message: str):
    # A fixed text per cause: Python's default filter then shows each cause once.
    warnings.warn(message, KernelFallbackWarning, stacklevel=3)


def routed_experts(x, inds, scores, gate_proj, up_proj, down_proj, shared=None,
                   fuse_shared=True, residual=None, config=None):
    """sum_k scores[..., k] * expert_{inds[..., k]}(x) (+ shared(x) when a shared-expert MLP
    is given) (+ residual): fused kernels when they apply, the shared expert inside their
    launches when it is shaped and quantized like one routed expert (and fuse_shared), the
    residual too when the shared expert is inside or absent. config: launch keys
    (moe.launch_config) instead of the defaults."""
    # x: [..., D], inds/scores: [..., K], residual: [..., D] -> [..., D]
    y = None
    if not kernels_enabled():
        pass
    elif (backend := gpu_backend()) is None:
        _warn("mlxkt: no GPU kernels on the CPU device; the routed experts run as plain MLX ops")
    elif unsupported(x, inds, gate_proj, up_proj, down_proj) is not None:
        _warn("mlxkt: routed-expert kernels do not cover these weights or activations (they "
              "take affine 2/4/8-bit weights with group 32/64/128 and float activations); "
              "they run as plain MLX ops")
    elif not decode_sized(x, inds, fused_max_pairs(quant_params(gate_proj)[0])):
        pass  # prefill-sized batch: the reference path is the faster one
    elif kernel_ready(backend, (sig := _signature(x, inds, gate_proj, down_proj))):
        fuse = (fuse_shared and shared is not None and shared_fits(shared, gate_proj, down_proj)
                and kernel_ready(backend, sig[:-1] + (True,)))  # the same, shared expert in
        inside = shared is None or fuse  # nothing left to add after the kernels
        res = residual is not None and inside and kernel_ready(
            backend, sig[:-1] + (fuse, True))  # the same, residual added by stage 2
        y = fused_routed_experts(x, inds, scores, gate_proj, up_proj, down_proj, backend,
                                 shared if fuse else None, residual if res else None,
                                 **(config or {}))
        if inside and (res or residual is None):
            return y
        if fuse:
            shared = None
    if y is None:
        y = routed_experts_reference(x, inds, scores, gate_proj, up_proj, down_proj)
    if shared is not None:
        y = y + shared(x)
    return y if residual is None else residual + y


def shared_fits(shared, gate_proj, down_proj) -> bool:
    """shared_unsupported(...) is None, kept on the shared MLP: eager decode asks every step,
    and Module attribute reads are slow."""
    key = (id(gate_proj), id(down_proj))
    hit = shared.__dict__.get("fits_routed")
    if hit is None or hit[0] != key:
        hit = (key, shared_unsupported(shared, gate_proj, down_proj) is None)
        shared.__dict__["fits_routed"] = hit  # a plain attribute: not a parameter
    return hit[1]


def quantized_linear(layer, x, norm=None, residual=None):
    """layer(x) for an nn.QuantizedLinear: the dense GEMV kernel for 1 to 8 rows on a GPU.
    With an nn.RMSNorm `norm` and/or a `residual`: layer(norm(x)) + residual, the norm and
    the add inside the kernel's launch when it runs (two kernels fewer at decode)."""
    from . import qgemv

    if kernels_enabled() and qgemv.decode_sized(x):
        backend = gpu_backend()
        why = qgemv.unsupported(layer, x) if backend else "no GPU"
        if why and backend:
            _warn("mlxkt: the quantized GEMV kernel does not cover some linear layers (it "
                  "takes affine 2/4/8-bit weights with group 32/64/128 and float "
                  "activations); they run as plain MLX ops")
        elif not why:
            sig = (layer.weight.shape[0], x.shape[-1], x.size // x.shape[-1], layer.bits,
                   layer.group_size, x.dtype, layer.scales.dtype)
            if norm is not None and not qgemv.fusable_norm(norm):
                x, norm = norm(x), None
            fused = (None if norm is None else (norm.weight.dtype, norm.eps), residual is not None)
            if getattr(layer, "lanes", None) and lanes_ready(backend, (0, *sig, *fused)):
                return _lanes_linear(layer, x, backend, norm, residual)
            if gemv_ready(backend, sig + fused if any(fused) else sig):
                return qgemv.quantized_gemv(x, layer, backend, norm, residual)
    return qgemv.reference(x, layer, norm, residual)


def _lanes_linear(layer, x, backend, norm, residual):
    from .qgemv_lanes import lanes_gemv

    y = lanes_gemv(x, layer.weight, layer.scales, layer.biases, layer.bits, layer.group_size,
                   backend, False, norm, residual)
    return y + layer.bias if "bias" in layer else y


def multi_linear(layer, x, transpose=True, shape=None):
    """layer(x) for mlx-lm's QuantizedMultiLinear (weight [H, O, in], affine with biases):
    the lanes kernel, all heads in one launch, for one sequence's decode-sized x [H, L, in]
    on a GPU; MLX's batched quantized matmul otherwise. shape: the output's shape instead of
    [H, L, O] (the same memory); x may then be any shape that holds [H, L, in] in order, and
    the kernel makes no reshape node for either."""
    from mlx_lm.models.mla import QuantizedMultiLinear

    w = layer.weight
    H, D = w.shape[0], x.shape[-1]
    L = x.size // (H * D)
    if (transpose and layer.lanes is not False and D * layer.bits == w.shape[2] * 32
            and (x.ndim == 3 and x.shape[0] == H or shape is not None and x.size == H * L * D)
            and L <= MAX_TOKENS and kernels_enabled() and (backend := gpu_backend()) is not None):
        sig = (H, w.shape[1], D, L, layer.bits, layer.group_size, x.dtype, layer.scales.dtype,
               None, False)
        if lanes_ready(backend, sig):
            from .qgemv_lanes import lanes_gemv

            return lanes_gemv(x, w, layer.scales, layer.biases, layer.bits, layer.group_size,
                              backend, heads=True, shape=shape)
    if shape is None:
        return QuantizedMultiLinear.__call__(layer, x, transpose)
    return QuantizedMultiLinear.__call__(layer, x.reshape(H, L, D), transpose).reshape(shape)


@lru_cache(maxsize=None)
def lanes_ready(backend: str, signature) -> bool:
    """Whether the lanes kernel takes calls of this signature (qgemv_lanes.probe's): per-head
    matrices it tiles, or one matrix of short rows; built and checked once."""
    from . import qgemv_lanes as ql

    H, O, D, N, bits, gs, dtype, scale_dtype = signature[:8]
    if bits not in (2, 4, 8) or gs not in (32, 64, 128):
        return False
    if not ql.supported(D, bits, gs, O, dtype, scale_dtype):
        return False
    if not H and not ql.short_rows(D, bits, gs):
        return False  # long rows: the block-per-row kernel
    return checked(f"{backend} quantized GEMV (lanes)", lambda: ql.probe(backend, signature),
                   probe_tolerance(dtype))


@lru_cache(maxsize=None)
def gemv_ready(backend: str, signature) -> bool:
    from . import qgemv

    return checked(f"{backend} quantized GEMV", lambda: qgemv.probe(backend, signature),
                   probe_tolerance(signature[5]))


def _signature(x, inds, gate_proj, down_proj, shared=False):
    return (x.shape[-1], gate_proj.weight.shape[-2], x.size // x.shape[-1], inds.shape[-1],
            quant_params(gate_proj), quant_params(down_proj), x.dtype,
            gate_proj.scales.dtype, down_proj.scales.dtype, shared)


@lru_cache(maxsize=None)
def kernel_ready(backend: str, signature) -> bool:
    """Build the kernels for one signature and check them against the reference once."""
    from .probe import probe

    return checked(f"{backend} routed-expert", lambda: probe(backend, signature),
                   probe_tolerance(signature[6]))


def checked(what: str, run_probe, tolerance: float) -> bool:
    """Run a kernel's one-time check (error against its reference); warn and say False when
    it fails to build or disagrees, so the caller keeps the plain MLX ops."""
    try:
        err = run_probe()
    except Exception as e:  # a build or launch failure
        _warn(f"mlxkt: the {what} kernel failed ({type(e).__name__}: {e}); using plain MLX ops")
        return False
    if not err < tolerance:
        _warn(f"mlxkt: the {what} kernel disagrees with the reference (error {err:.2e}); "
              "using plain MLX ops")
        return False
    return True


def probe_tolerance(dtype) -> float:
    """Relative L2 error allowed against the float32 reference (output rounding dominates)."""
    return {mx.float32: 1e-3, mx.float16: 3e-3}.get(dtype, 1e-2)
