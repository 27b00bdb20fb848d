"""The short-row / per-head quantized GEMV kernel (metal/qgemv_lanes.inc).

The kernel body runs on the CPU through the C++ emulation (the same source as the Metal and
CUDA kernels); the `gpu` tests run the real kernel against MLX's quantized matmul.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxkt.kernels import emulate, qgemv_lanes as ql
from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance
from mlxkt.kernels.probe import relative_error

emulated = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")


def heads_case(H, O, D, N, bits=4, gs=64, dtype=mx.float32, seed=0):
    w, s, b = ql.random_heads(H, O, D, bits, gs, dtype, seed=seed)
    x = mx.random.normal((H, N, D), key=mx.random.key(seed + 1)).astype(dtype)
    return x, w, s, b


def f32_reference(x, w, s, b, bits, gs, norm=None, res=None):
    f32 = mx.float32
    return ql.reference(x.astype(f32), w, s.astype(f32), b.astype(f32), bits, gs, norm,
                        None if res is None else res.astype(f32))


@emulated
@pytest.mark.parametrize("H,O,D,N,bits,gs,cfg", [
    (3, 32, 128, 1, 4, 64, {}),                       # embed_q's rows: 4 lanes a row
    (2, 16, 512, 2, 4, 64, {}),                       # unembed_out's: 16 lanes a row
    (2, 64, 128, 3, 8, 32, {}),                       # 8-bit, group 32
    (2, 32, 256, 8, 2, 64, {"lpr": 2, "nw": 1, "rpl": 2}),  # 8 tokens, 2 pieces a lane
    (4, 8, 128, 1, 4, 64, {"wp": 1, "lpr": 8, "nw": 1, "rpl": 1}),  # one-word pieces
])
def test_emulated_heads_match_the_batched_quantized_matmul(H, O, D, N, bits, gs, cfg):
    x, w, s, b = heads_case(H, O, D, N, bits, gs, seed=N)
    y = ql.lanes_gemv(x, w, s, b, bits, gs, "cpu", heads=True, **cfg)
    assert y.shape == (H, N, O)
    assert not np.isnan(np.array(y)).any()  # the emulation poisons unwritten outputs
    assert relative_error(y, ql.reference(x, w, s, b, bits, gs)) < 3e-5


@emulated
@pytest.mark.parametrize("dtype,gdtype,norm_on,res_on,lead", [
    (mx.float32, mx.float32, False, False, (1,)),
    (mx.float32, mx.bfloat16, True, True, (3,)),      # q_b_proj's shape of call, 48 pieces
    (mx.bfloat16, mx.bfloat16, True, False, (1, 2)),  # raw 16-bit x and g, 3-D x
    (mx.float16, mx.float32, False, True, (2,)),
])
def test_emulated_one_matrix_folds_norm_and_residual(dtype, gdtype, norm_on, res_on, lead):
    """y = W rms_norm(x, g) + res for one matrix of rows of 48 pieces (3 a lane)."""
    O, D = 32, 1536
    w, s, b = (a[0] for a in ql.random_heads(1, O, D, 4, 64, mx.float32, seed=2))
    x = (4 * mx.random.normal((*lead, D), key=mx.random.key(3))).astype(dtype)
    norm = None
    if norm_on:
        norm = nn.RMSNorm(D, eps=1e-3)
        norm.weight = (1 + 0.5 * mx.random.normal((D,), key=mx.random.key(4))).astype(gdtype)
    res = mx.random.normal((*lead, O), key=mx.random.key(5)).astype(dtype) if res_on else None
    y = ql.lanes_gemv(x, w, s, b, 4, 64, "cpu", norm=norm, residual=res)
    assert y.shape == (*lead, O) and y.dtype == dtype
    assert not np.isnan(np.array(y.astype(mx.float32))).any()
    ref = f32_reference(x, w, s, b, 4, 64, norm, res)
    assert relative_error(y, ref) < max(3e-5, probe_tolerance(dtype) / 2)


def test_launch_config_fits_blocks_to_heads():
    # embed_q: 128 inputs = 4 pieces -> 4 lanes a row, 8 rows a warp, 2 warps x 4 rows.
    assert ql.launch_config(128, 4, 64, 512) == {"lpr": 4, "rpl": 4, "nw": 2, "wp": 4}
    # q_b_proj: 48 pieces -> 16 lanes of 3.
    assert ql.launch_config(1536, 4, 64, 24576)["lpr"] == 16
    # 12 rows a head: 2 warps x 2 groups x 4 or 2 rows do not divide it, x 1 row does.
    assert ql.launch_config(512, 4, 64, 12) == {"lpr": 16, "rpl": 1, "nw": 2, "wp": 4}
    with pytest.raises(ValueError):
        ql.launch_config(128, 4, 64, 3)  # no block of 8-row warps tiles 3 rows
    with pytest.raises(ValueError):
        ql.launch_config(4096, 4, 64, 64, lpr=8)  # 16 pieces a lane: too many registers
    with pytest.raises(ValueError, match="at most 8"):
        ql.launch_config(128, 4, 64, 512, tokens=9)
    assert not ql.supported(128, 4, 64, 3, mx.float16, mx.float16)
    assert ql.supported(128, 4, 64, 512, mx.bfloat16, mx.bfloat16)


@emulated
def test_selftest_rows_on_the_emulation():
    rows = ql.selftest("cpu", echo=lambda *a: None, tokens=(1,),
                       shapes={"small heads": (2, 16, 128), "small matrix": (0, 16, 256)})
    assert [r["status"] for r in rows] == ["pass", "pass"]


DEEPSEEK_HEADS = [(128, 512, 128), (128, 128, 512), (16, 512, 128)]  # V3 / V2-Lite


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("H,O,D", DEEPSEEK_HEADS)
@pytest.mark.parametrize("N", [1, 2, 8])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_gpu_heads_at_deepseek_shapes(H, O, D, N, dtype):
    x, w, s, b = heads_case(H, O, D, N, dtype=dtype)
    y = ql.lanes_gemv(x, w, s, b, 4, 64, gpu_backend(), heads=True)
    with mx.stream(mx.cpu):  # MLX's CUDA float32 matmuls are TF32
        ref = f32_reference(x, w, s, b, 4, 64)
        mx.eval(ref)
    assert relative_error(y, ref) < probe_tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("N", [1, 2])
def test_gpu_q_b_proj_with_norm_and_residual(N):
    O, D = 24576, 1536
    w, s, b = (a[0] for a in ql.random_heads(1, O, D, 4, 64, mx.bfloat16))
    x = (4 * mx.random.normal((1, N, D))).astype(mx.bfloat16)
    norm = nn.RMSNorm(D)
    norm.weight = (1 + 0.3 * mx.random.normal((D,))).astype(mx.bfloat16)
    res = mx.random.normal((1, N, O)).astype(mx.bfloat16)
    y = ql.lanes_gemv(x, w, s, b, 4, 64, gpu_backend(), norm=norm, residual=res)
    with mx.stream(mx.cpu):
        ref = f32_reference(x, w, s, b, 4, 64, norm, res)
        mx.eval(ref)
    assert relative_error(y, ref) < probe_tolerance(mx.bfloat16)


@emulated
def test_dispatch_sends_short_rows_to_the_lanes_kernel_when_asked(monkeypatch):
    """quantized_linear: a layer's `lanes = True` sends rows of few pieces to the lanes
    kernel (norm and residual folded); long rows, and short ones by default, take the
    block-per-row kernel."""
    from mlxkt.kernels import dispatch, qgemv
    from mlxkt.layers.qlinear import KernelQuantizedLinear

    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "cpu")
    seen = []
    real_lanes, real_gemv = ql.lanes_gemv, qgemv.quantized_gemv
    monkeypatch.setattr(ql, "lanes_gemv", lambda *a, **k: seen.append("lanes") or real_lanes(*a, **k))
    monkeypatch.setattr(qgemv, "quantized_gemv",
                        lambda *a, **k: seen.append("block") or real_gemv(*a, **k))
    short = KernelQuantizedLinear.wrap(qgemv.random_linear(16, 256, 4, 64, mx.float32))
    long = KernelQuantizedLinear.wrap(qgemv.random_linear(8, 2048, 4, 64, mx.float32))
    norm = nn.RMSNorm(256)
    x, res, x_long = mx.random.normal((2, 256)), mx.random.normal((2, 16)), mx.random.normal((1, 2048))
    for f in (dispatch.lanes_ready, dispatch.gemv_ready):
        f.cache_clear()
    try:
        calls = []
        for layer, args, lanes in ((short, (x, norm, res), None), (short, (x, norm, res), True),
                                   (long, (x_long,), True)):
            layer.lanes = lanes
            dispatch.quantized_linear(layer, *args)  # the one-time probes run kernels too
            seen.clear()
            calls.append((dispatch.quantized_linear(layer, *args), list(seen)))
    finally:
        for f in (dispatch.lanes_ready, dispatch.gemv_ready):
            f.cache_clear()
    assert [c[1] for c in calls] == [["block"], ["lanes"], ["block"]]
    assert relative_error(calls[1][0], qgemv.reference(x, short, norm, res)) < 3e-5


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        from mlx_lm.models.mla import MultiLinear

        self.embed_q = MultiLinear(128, 32, 4).to_quantized(group_size=64, bits=4)


@emulated
def test_optimize_wraps_per_head_linears_and_plain_linears_undoes_it(monkeypatch):
    from mlx_lm.models.mla import QuantizedMultiLinear

    from mlxkt.inject import optimize, plain_linears
    from mlxkt.kernels import dispatch
    from mlxkt.layers.qlinear import KernelQuantizedMultiLinear, heads_linear

    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "cpu")
    model = Heads()
    x = mx.random.normal((4, 1, 128))
    latent = mx.random.normal((2, 4, 5, 32))  # the long-prefill path: x @ W, not W^T
    want, want_t = model.embed_q(x), model.embed_q(latent, transpose=False)
    optimize(model, rules=(), linears=True)
    layer = model.embed_q
    assert type(layer) is KernelQuantizedMultiLinear and not layer.trainable_parameters()
    seen = []
    real = ql.lanes_gemv
    monkeypatch.setattr(ql, "lanes_gemv", lambda *a, **k: seen.append(k) or real(*a, **k))
    dispatch.lanes_ready.cache_clear()
    try:
        y = layer(x)
        seen.clear()
        y = layer(x)
        assert seen == [{"heads": True, "shape": None}]
        assert mx.array_equal(layer(latent, transpose=False), want_t)  # not the kernel's case
        # The heads as rows in, one row of all heads out: the kernel declares the shape.
        rows = heads_linear(layer, x.reshape(1, 1, 4, 128), (1, 1, None))
        assert seen[-1] == {"heads": True, "shape": (1, 1, 128)}
        assert rows.shape == (1, 1, 128) and mx.array_equal(rows.reshape(y.shape), y).item()
        layer.lanes = False  # the bench variant no-lanes
        assert mx.array_equal(layer(x), want) and len(seen) == 2
        rows = heads_linear(layer, x.reshape(1, 1, 4, 128), (1, 1, 4, None))  # by reshapes
        assert rows.shape == (1, 1, 4, 32) and mx.array_equal(rows.reshape(want.shape), want)
    finally:
        dispatch.lanes_ready.cache_clear()
    assert relative_error(y, want) < 3e-5
    assert plain_linears(model) == 1 and type(model.embed_q) is QuantizedMultiLinear
    assert mx.array_equal(model.embed_q(x), want)
