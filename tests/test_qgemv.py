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


@emulated
def test_selftest_rows_on_the_emulation():
    rows = qgemv.selftest("cpu", echo=lambda *a: None, tokens=(1, 2), shapes={"small": (40, 512)})
    assert [(r["tokens"], r["status"]) for r in rows] == [(1, "pass"), (2, "pass")]


def test_launch_config_limits():
    assert qgemv.launch_config(7168, 16384, 4, 64) == {"nw": 8, "rpw": 8, "wp": 4, "sa": 1}
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
