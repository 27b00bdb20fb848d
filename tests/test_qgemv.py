"""The dense quantized GEMV kernel (metal/qgemv.inc) and its module swap.

The kernel body runs on the CPU through the C++ emulation (the same source as the Metal and
CUDA kernels); the `gpu` tests run the real kernel against MLX's quantized matmul.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxkt.inject import optimize, plain_linears
from mlxkt.kernels import dispatch, emulate, qgemv
from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance
from mlxkt.kernels.probe import relative_error
from mlxkt.layers.qlinear import KernelQuantizedLinear

emulated = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")


def float32_reference(x, layer):
    return qgemv.reference(x.astype(mx.float32), qgemv._float32_copy(layer))


@emulated
@pytest.mark.parametrize("O,D,N,bits,gs,cfg", [
    (20, 256, 1, 4, 64, {}),                          # rows not a multiple of the block's
    (13, 1088, 3, 4, 64, {}),                         # rows end part-way through the pieces
    (9, 512, 2, 8, 32, {}),
    (7, 512, 8, 2, 64, {}),                           # 8 tokens
    (5, 256, 2, 2, 32, {}),                           # 2-bit, group 32: two-word pieces
    (33, 2048, 2, 4, 128, {"nw": 2, "rpw": 3}),
    (5, 4096, 1, 4, 64, {"wp": 1, "sa": 2}),          # one-word pieces, two load stages
    (6, 4096, 2, 4, 64, {"wp": 2, "nw": 3}),
    (20, 1536, 2, 4, 64, {}),                         # short rows: 3 warps of 8-byte pieces
])
def test_emulated_kernel_matches_reference(O, D, N, bits, gs, cfg):
    layer = qgemv.random_linear(O, D, bits, gs, mx.float32, seed=N)
    x = mx.random.normal((N, D), key=mx.random.key(N))
    y = qgemv.quantized_gemv(x, layer, "cpu", **cfg)
    assert not np.isnan(np.array(y)).any()  # the emulation poisons unwritten outputs
    assert relative_error(y, qgemv.reference(x, layer)) < 3e-5


@emulated
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_emulated_kernel_unpacks_16_bit_inputs(dtype):
    """x is read as raw 16-bit floats (kt_load4): normal and float16-subnormal values."""
    layer = qgemv.random_linear(10, 512, 4, 64, dtype, seed=1)
    x = (3 * mx.random.normal((2, 512), key=mx.random.key(2))).astype(dtype)
    x[:, 100:104] = 1e-6  # subnormal in float16
    y = qgemv.quantized_gemv(x, layer, "cpu")
    assert y.dtype == dtype
    err = relative_error(y, float32_reference(x, layer))
    assert err < probe_tolerance(dtype)
    assert err <= 1.5 * relative_error(qgemv.reference(x, layer), float32_reference(x, layer))


def random_norm(D, dtype, seed=0, eps=1e-6):
    norm = nn.RMSNorm(D, eps=eps)
    norm.weight = (1 + 0.5 * mx.random.normal((D,), key=mx.random.key(seed))).astype(dtype)
    return norm


@emulated
@pytest.mark.parametrize("O,D,N,dtype,gdtype,norm_on,res_on,cfg", [
    (20, 256, 1, mx.float32, mx.float32, True, False, {}),
    (13, 1088, 3, mx.float32, mx.bfloat16, True, True, {"nw": 2}),   # rows end mid-pieces
    (9, 512, 2, mx.bfloat16, mx.bfloat16, True, True, {}),           # raw 16-bit x and g
    (7, 512, 8, mx.float16, mx.float32, False, True, {}),
    (33, 2048, 2, mx.float32, mx.float16, True, False, {"nw": 3, "rpw": 3}),
    (27, 1536, 1, mx.bfloat16, mx.bfloat16, True, False, {}),        # q_b_proj's launch
])
def test_emulated_kernel_folds_norm_and_residual(O, D, N, dtype, gdtype, norm_on, res_on, cfg):
    """y = W rms_norm(x, g) + res in one launch, against the same steps in MLX ops."""
    layer = qgemv.random_linear(O, D, 4, 64, mx.float32, seed=N)
    x = (4 * mx.random.normal((N, D), key=mx.random.key(N))).astype(dtype)  # not unit scale
    norm = random_norm(D, gdtype, seed=N, eps=1e-3) if norm_on else None
    res = mx.random.normal((N, O), key=mx.random.key(9)).astype(dtype) if res_on else None
    y = qgemv.quantized_gemv(x, layer, "cpu", norm, res, **cfg)
    assert y.dtype == dtype and not np.isnan(np.array(y.astype(mx.float32))).any()
    f32 = lambda a: None if a is None else a.astype(mx.float32)
    ref = qgemv.reference(f32(x), layer, norm, f32(res))
    tol = 3e-5 if dtype == mx.float32 else probe_tolerance(dtype)
    assert relative_error(y, ref) < tol
    # Each part matters: without it the result is far off.
    if norm_on:
        assert relative_error(qgemv.reference(f32(x), layer, None, f32(res)), ref) > 10 * tol
    if res_on:
        assert relative_error(qgemv.reference(f32(x), layer, norm), ref) > 10 * tol


@emulated
@pytest.mark.parametrize("lead", [(), (3,), (1, 2)])
def test_emulated_kernel_keeps_leading_dims_without_reshapes(lead):
    """x of any leading shape in, y of the same leading shape out: the wrapper passes the
    arrays as they are and declares y's full shape (no reshape nodes around the launch)."""
    layer = qgemv.random_linear(16, 128, seed=3)
    x = mx.random.normal((*lead, 128), key=mx.random.key(4))
    res = mx.random.normal((*lead, 16), key=mx.random.key(5))
    y = qgemv.quantized_gemv(x, layer, "cpu", residual=res)
    assert y.shape == (*lead, 16)
    with mx.stream(mx.cpu):  # MLX CUDA's quantized matmul fails on a 1-D x (SmallVector)
        assert relative_error(y, qgemv.reference(x, layer, residual=res)) < 1e-5


@emulated
def test_dispatch_folds_only_plain_rms_norms(monkeypatch):
    """quantized_linear hands an nn.RMSNorm to the kernel; another norm runs first, in MLX."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "cpu")
    seen = []
    real = qgemv.quantized_gemv
    monkeypatch.setattr(qgemv, "quantized_gemv",
                        lambda x, layer, backend, norm=None, residual=None:
                        seen.append(norm) or real(x, layer, backend, norm, residual))
    layer = qgemv.random_linear(16, 256, 4, 64, mx.float32)
    x = mx.random.normal((1, 256))
    norm, layer_norm = random_norm(256, mx.float32), nn.LayerNorm(256)
    dispatch.gemv_ready.cache_clear()
    try:
        dispatch.quantized_linear(layer, x, norm)  # the one-time probes call the kernel too
        dispatch.quantized_linear(layer, x, layer_norm)
        seen.clear()
        y1 = dispatch.quantized_linear(layer, x, norm)
        y2 = dispatch.quantized_linear(layer, x, layer_norm)
    finally:
        dispatch.gemv_ready.cache_clear()
    assert seen == [norm, None]
    assert relative_error(y1, qgemv.reference(x, layer, norm)) < 3e-5
    assert relative_error(y2, qgemv.reference(layer_norm(x), layer)) < 3e-5


def test_norm_linear_on_plain_layers():
    """Layers the kernel does not take compute norm, product and residual in steps."""
    from mlxkt.layers.qlinear import norm_linear

    lin, norm = nn.Linear(64, 8), random_norm(64, mx.float32)
    x, r = mx.random.normal((2, 64)), mx.random.normal((2, 8))
    assert mx.allclose(norm_linear(lin, x, norm, r), r + lin(norm(x)))
    assert mx.allclose(norm_linear(lin, x), lin(x))


@emulated
def test_selftest_rows_on_the_emulation():
    rows = qgemv.selftest("cpu", echo=lambda *a: None, tokens=(1, 2), shapes={"small": (40, 512)})
    assert [(r["shape"], r["tokens"], r["status"]) for r in rows] == [
        ("small", 1, "pass"), ("small", 2, "pass"),
        ("small +norm+res", 1, "pass"), ("small +norm+res", 2, "pass")]


def test_launch_config_limits():
    assert qgemv.launch_config(7168, 16384, 4, 64) == {"nw": 8, "rpw": 8, "wp": 4, "sa": 1}
    # short rows (q_b_proj: 48 16-byte pieces): 3 warps of 8-byte pieces, 8 rows per block;
    # with the piece size given, 2 warps x 4 rows
    assert qgemv.launch_config(24576, 1536, 4, 64) == {"nw": 3, "rpw": 8, "wp": 2, "sa": 1}
    assert qgemv.launch_config(24576, 1536, 4, 64, wp=4) == {"nw": 2, "rpw": 4, "wp": 4, "sa": 1}
    assert qgemv.launch_config(7168, 2048, 4, 64, tokens=8)["rpw"] == 4  # 8 x 4 <= 32 threads
    with pytest.raises(ValueError):
        qgemv.launch_config(64, 512, 4, 64, wp=4, tokens=8, nw=1, rpw=8)


def quantized_mlp(bias=False):
    model = nn.Sequential(nn.Linear(256, 128, bias=bias), nn.Linear(128, 64), nn.Linear(64, 32))
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: m.weight.shape[-1] >= 128)
    mx.eval(model.parameters())
    return model


def test_optimize_swaps_linears_only_when_asked_and_plain_linears_undoes_it(monkeypatch):
    monkeypatch.setenv(dispatch.GEMV_ENV, "0")
    model = quantized_mlp(bias=True)
    x = mx.random.normal((3, 256))
    want = model(x)
    optimize(model)  # MLXKT_GEMV=0: the MoE rules only
    assert not any(isinstance(m, KernelQuantizedLinear) for m in model.layers)
    optimize(model, linears=True)
    kinds = [type(m).__name__ for m in model.layers]
    assert kinds == ["KernelQuantizedLinear", "KernelQuantizedLinear", "Linear"]  # 64 wide: not quantized
    assert relative_error(model(x), want) < 1e-3  # the CPU runs MLX's matmul: exact there
    assert "bias" in model.layers[0] and not model.layers[0].trainable_parameters()
    assert plain_linears(model) == 2
    assert [type(m).__name__ for m in model.layers] == ["QuantizedLinear", "QuantizedLinear", "Linear"]
    assert mx.array_equal(model(x), want)


def test_gemv_switch(monkeypatch):
    monkeypatch.delenv(dispatch.GEMV_ENV, raising=False)
    assert [dispatch.gemv_enabled(b) for b in ("cuda", "metal", None)] == [True, False, False]
    monkeypatch.setenv(dispatch.GEMV_ENV, "1")
    assert [dispatch.gemv_enabled(b) for b in ("cuda", "metal", None)] == [True, True, False]
    monkeypatch.setenv(dispatch.GEMV_ENV, "0")
    assert not dispatch.gemv_enabled("cuda")


# --- on a GPU ---------------------------------------------------------------------------------

DEEPSEEK = [(1536, 7168), (576, 7168), (24576, 1536), (7168, 16384), (2048, 7168), (7168, 2048)]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("O,D", DEEPSEEK)
@pytest.mark.parametrize("N", [1, 2, 8])
def test_gpu_kernel_at_deepseek_shapes(O, D, N):
    layer = qgemv.random_linear(O, D, 4, 64, mx.bfloat16, seed=N)
    x = mx.random.normal((N, D), key=mx.random.key(N)).astype(mx.bfloat16)
    y = qgemv.quantized_gemv(x, layer, gpu_backend())
    ref = float32_reference(x, layer)
    err = relative_error(y, ref)
    assert err < probe_tolerance(mx.bfloat16)
    assert err <= 1.5 * relative_error(qgemv.reference(x, layer), ref)
    assert mx.array_equal(y, qgemv.quantized_gemv(x, layer, gpu_backend()))  # deterministic


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("O,D", [(1536, 7168), (576, 7168), (24576, 1536), (7168, 16384)])
@pytest.mark.parametrize("N", [1, 2])
def test_gpu_kernel_folds_norm_and_residual(O, D, N):
    """The decode step's folds at DeepSeek-V3 shapes: input/q_a norms before q_a, kv_a and
    q_b, the residual after o_proj."""
    layer = qgemv.random_linear(O, D, 4, 64, mx.bfloat16, seed=N)
    x = (3 * mx.random.normal((N, D), key=mx.random.key(N))).astype(mx.bfloat16)
    norm = random_norm(D, mx.bfloat16, seed=N)
    res = mx.random.normal((N, O), key=mx.random.key(5)).astype(mx.bfloat16)
    f32 = lambda a: a.astype(mx.float32)
    f32_layer = qgemv._float32_copy(layer)
    for n, r in ((norm, None), (None, res), (norm, res)):
        y = qgemv.quantized_gemv(x, layer, gpu_backend(), n, r)
        ref = qgemv.reference(f32(x), f32_layer, n, None if r is None else f32(r))
        native = qgemv.reference(x, layer, n, r)  # MLX's ops in bf16
        err = relative_error(y, ref)
        assert err < probe_tolerance(mx.bfloat16), err
        assert err <= 1.5 * relative_error(native, ref), err


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("bits,gs,dtype,cfg", [
    (8, 64, mx.bfloat16, {}), (2, 64, mx.float16, {}), (4, 32, mx.float32, {}),
    (4, 128, mx.float16, {}), (4, 64, mx.bfloat16, {"wp": 1}), (4, 64, mx.bfloat16, {"wp": 2, "sa": 2}),
    (4, 64, mx.float32, {"nw": 3, "rpw": 5})])
def test_gpu_kernel_bits_groups_types_configs(bits, gs, dtype, cfg):
    layer = qgemv.random_linear(1000, 4096, bits, gs, dtype, seed=bits)
    x = mx.random.normal((3, 4096), key=mx.random.key(bits)).astype(dtype)
    y = qgemv.quantized_gemv(x, layer, gpu_backend(), **cfg)
    assert relative_error(y, float32_reference(x, layer)) < probe_tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
def test_gpu_swapped_layer_takes_the_kernel(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    layer = KernelQuantizedLinear.wrap(qgemv.random_linear(512, 1024, 4, 64, mx.bfloat16))
    x = mx.random.normal((1, 2, 1024)).astype(mx.bfloat16)
    assert mx.array_equal(layer(x), qgemv.quantized_gemv(x, layer, gpu_backend()))
    big = mx.random.normal((1, 16, 1024)).astype(mx.bfloat16)  # prefill-sized: MLX's matmul
    assert mx.array_equal(layer(big), qgemv.reference(big, layer))
    monkeypatch.setenv(dispatch.ENV, "0")
    assert mx.array_equal(layer(x), qgemv.reference(x, layer))
