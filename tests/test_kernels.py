"""CPU tests of the routed-expert reference and of the kernel dispatch."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mlxkt.kernels import dispatch, moe, sources
from mlxkt.kernels.dispatch import KernelFallbackWarning, routed_experts
from mlxkt.kernels.probe import random_problem, relative_error
from mlxkt.kernels.reference import routed_experts_reference
from mlxkt.layers.experts import RoutedExperts
from mlxkt.kernels.sources import read_source


def dense(layer):
    """[E, out, in] float64 weights of a (quantized) switch layer."""
    if "scales" in layer:
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    else:
        w = layer.weight
    return np.array(w.astype(mx.float32), dtype=np.float64)


def naive(x, inds, scores, gate, up, down):
    """A plain loop over tokens and their experts, in float64."""
    wg, wu, wd = dense(gate), dense(up), dense(down)
    xs = np.array(x.astype(mx.float32), dtype=np.float64).reshape(-1, x.shape[-1])
    ix = np.array(inds).reshape(len(xs), -1)
    sc = np.array(scores.astype(mx.float32), dtype=np.float64).reshape(len(xs), -1)
    y = np.zeros_like(xs)
    for t in range(len(xs)):
        for k in range(ix.shape[1]):
            e = ix[t, k]
            g, u = wg[e] @ xs[t], wu[e] @ xs[t]
            y[t] += sc[t, k] * (wd[e] @ (g / (1 + np.exp(-g)) * u))
    return y.reshape(x.shape)


@pytest.mark.parametrize("N,K,E,bits,gs", [
    (1, 2, 4, 4, 64), (3, 4, 6, 8, 32), (5, 3, 7, 4, 128),
    (24, 4, 8, 4, 64),  # 96 pairs: the sorted gather path
])
def test_reference_matches_naive_loop_quantized(N, K, E, bits, gs):
    x, inds, scores, gate, up, down = random_problem(256, 128, N, K, E, bits=(bits, bits),
                                                     group_size=(gs, gs), seed=N)
    y = routed_experts_reference(x, inds, scores, gate, up, down)
    want = naive(x, inds, scores, gate, up, down)
    assert relative_error(y, mx.array(want.astype(np.float32))) < 1e-4


@pytest.mark.parametrize("lead", [(1, 1), (2, 3), (4, 20)])
def test_reference_matches_naive_loop_dense(lead):
    D, I, E, K = 64, 48, 6, 3
    mx.random.seed(3)
    gate, up, down = (SwitchLinear(D, I, E, bias=False), SwitchLinear(D, I, E, bias=False),
                      SwitchLinear(I, D, E, bias=False))
    x = mx.random.normal(lead + (D,))
    rng = np.random.default_rng(0)
    inds = mx.array(np.stack([rng.choice(E, K, replace=False)
                              for _ in range(int(np.prod(lead)))]).reshape(lead + (K,)))
    scores = mx.random.uniform(shape=lead + (K,))
    y = routed_experts_reference(x, inds, scores, gate, up, down)
    assert y.shape == x.shape
    assert relative_error(y, mx.array(naive(x, inds, scores, gate, up, down).astype(np.float32))) < 1e-4


def test_routed_experts_module_uses_reference_on_cpu(cpu_device):
    layer = RoutedExperts(64, 32, 4)
    x = mx.random.normal((2, 3, 64))
    inds = mx.array(np.random.default_rng(0).integers(0, 4, (2, 3, 2)).astype(np.uint32))
    scores = mx.random.uniform(shape=(2, 3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelFallbackWarning)
        y = layer(x, inds, scores)
    ref = routed_experts_reference(x, inds, scores, layer.gate_proj, layer.up_proj,
                                   layer.down_proj)
    assert mx.array_equal(y, ref)


def test_cpu_device_warns_once(monkeypatch, cpu_device):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    x, inds, scores, gate, up, down = random_problem(128, 64, 2, 2, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            y = routed_experts(x, inds, scores, gate, up, down)
    assert dispatch.gpu_backend() is None
    assert len([w for w in seen if issubclass(w.category, KernelFallbackWarning)]) == 1
    assert mx.array_equal(y, routed_experts_reference(x, inds, scores, gate, up, down))


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "0")
    assert dispatch.kernel_backend() is None
    x, inds, scores, gate, up, down = random_problem(128, 64, 1, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when asked for the reference
        y = routed_experts(x, inds, scores, gate, up, down)
    assert mx.array_equal(y, routed_experts_reference(x, inds, scores, gate, up, down))


def test_unsupported_cases():
    x, inds, scores, gate, up, down = random_problem(128, 64, 2, 2, 4)
    assert moe.unsupported(x, inds, gate, up, down) is None
    assert moe.decode_sized(x, inds)
    assert not moe.decode_sized(mx.zeros((9, 128)), mx.zeros((9, 2), mx.uint32))
    assert not moe.decode_sized(mx.zeros((3, 128)), mx.zeros((3, 8), mx.uint32), max_pairs=16)
    plain = SwitchLinear(128, 64, 4, bias=False)
    assert "quantized" in moe.unsupported(x, inds, plain, up, down)
    assert "activations" in moe.unsupported(x.astype(mx.int32), inds, gate, up, down)
    gate.bits = 3  # 3-bit values straddle words: not for these kernels
    assert moe.unsupported(x, inds, gate, up, down) is not None


def test_dispatch_falls_back_when_the_kernel_fails(monkeypatch):
    """A kernel that raises at build time is caught by the probe: one warning, reference."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "metal")

    def broken(backend, spec):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(moe, "kernel_fn", broken)
    dispatch.kernel_ready.cache_clear()
    x, inds, scores, gate, up, down = random_problem(128, 64, 1, 2, 4)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            y = routed_experts(x, inds, scores, gate, up, down)
            routed_experts(x, inds, scores, gate, up, down)
    finally:
        dispatch.kernel_ready.cache_clear()
    msgs = [str(w.message) for w in seen if issubclass(w.category, KernelFallbackWarning)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0]
    assert mx.array_equal(y, routed_experts_reference(x, inds, scores, gate, up, down))


@pytest.mark.parametrize("backend", ["metal", "cuda", "cpu"])
def test_sources_assemble(backend):
    for spec in (sources.GATE_UP, sources.DOWN):
        src, hdr = sources.source(backend, spec), sources.header(backend)
        for macro in ("KT_FN", "KT_SHARED", "KT_SYNC", "KT_UNROLL", "KT_FMA", "kt_and_or"):
            assert macro in hdr
        if backend == "metal":
            assert "threadgroup_position_in_grid" in src  # MLX adds the attribute it sees
        if backend == "cuda":
            assert "blockIdx" in src
    assert "kt_fma4" in read_source("kt_common.h")


def test_launch_config_keeps_loads_bounded():
    for D, I, bits in [(7168, 2048, 4), (7168, 2048, 8), (4096, 14336, 4), (256, 128, 2)]:
        cfg = moe.launch_config(D, I, bits, bits)
        chunks_a = -(-D // (128 // bits) // 32)
        chunks_b = -(-I // (128 // bits) // 32)
        assert cfg["sa"] <= 8 and cfg["sa"] * -(-chunks_a // cfg["sa"]) >= chunks_a
        assert cfg["ue"] * cfg["rb"] * cfg["sb"] <= 8 or cfg["ue"] == 1
        assert cfg["sb"] * -(-chunks_b // cfg["sb"]) >= chunks_b
    # Many token-expert pairs: fewer, longer stage-1 blocks (one plan per block).
    assert moe.launch_config(7168, 2048, 4, 4, pairs=64)["rt"] > 1
    assert moe.launch_config(7168, 2048, 4, 4, pairs=8)["rt"] == 1
    # Defaults: the H100 sweep's fastest at <= 4 bits, the unswept old ones at 8 bits.
    cfg = moe.launch_config(7168, 2048, 4, 4)
    assert (cfg["rw"], cfg["sa"], cfg["rb"], cfg["sb"], cfg["ue"], cfg["dq"]) == (2, 4, 8, 1, 1, 1)
    cfg = moe.launch_config(7168, 2048, 8, 8)
    assert (cfg["rw"], cfg["rb"], cfg["dq"]) == (1, 2, 0)
    # The sweep's keys: explicit values win, bad values are refused.
    cfg = moe.launch_config(7168, 2048, 4, 4, rt=4, rw=1, sa=4, rb=2, sb=1, ue=8, dq=0)
    assert (cfg["rt"], cfg["rw"], cfg["sa"], cfg["rb"], cfg["sb"], cfg["ue"], cfg["dq"]) == (
        4, 1, 4, 2, 1, 8, 0)
    # One row pair per warp instead of two: twice the row tiles.
    assert (moe.launch_config(7168, 2048, 4, 4, pairs=64, rw=1)["rt"]
            == 2 * moe.launch_config(7168, 2048, 4, 4, pairs=64)["rt"])
    with pytest.raises(ValueError):
        moe.launch_config(7168, 2048, 4, 4, dq=2)
    with pytest.raises(ValueError):
        moe.launch_config(7168, 2048, 4, 4, xs=2)
    with pytest.raises(TypeError):  # no such key
        moe.launch_config(7168, 2048, 4, 4, xw=1)
    # Stage 2's warps split the experts up to 8 pairs at <= 4 bits only (2026-11-26 sweep).
    assert moe.launch_config(7168, 2048, 4, 4, pairs=8)["xs"] == 1
    assert moe.launch_config(7168, 2048, 4, 4, pairs=16)["xs"] == 0
    assert moe.launch_config(7168, 2048, 8, 8, pairs=8)["xs"] == 0
    assert moe.launch_config(7168, 2048, 4, 4, pairs=64, xs=1)["xs"] == 1


@pytest.mark.parametrize("bits,N,fused", [(4, 8, True), (2, 8, True), (8, 2, True),
                                           (8, 3, False), (4, 9, False)])
def test_dispatch_pair_limit_by_bits(monkeypatch, bits, N, fused):
    """Top-8: the kernels up to 64 pairs at <= 4 bits, 16 at 8 bits; beyond, the reference."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(dispatch, "kernel_ready", lambda backend, signature: True)
    calls = []
    monkeypatch.setattr(dispatch, "fused_routed_experts", lambda *a: calls.append(a) or a[0])
    x, inds, scores, gate, up, down = random_problem(128, 64, N, 8, 12, (bits, bits))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        routed_experts(x, inds, scores, gate, up, down)
    assert bool(calls) == fused
    assert moe.fused_max_pairs(bits) == (64 if bits <= 4 else 16)


def test_selftest_command_on_cpu(cpu_device):
    import typer
    from typer.testing import CliRunner

    from mlxkt.kernels.cli import selftest_command

    app = typer.Typer()
    app.command()(selftest_command)
    result = CliRunner().invoke(app, ["--tokens", "1"])
    assert result.exit_code == 0
    assert "kernel backend: none" in result.output and "No Metal or CUDA GPU" in result.output
