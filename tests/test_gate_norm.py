"""The MoE layer's input RMSNorm and router logits in one kernel (metal/gate_norm.inc). The
body runs on the CPU through the C++ emulation; the `gpu` tests run the real kernel at
DeepSeek-V3's widths."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxkt.config import ModelArgs
from mlxkt.kernels import dispatch, emulate, gate_norm, router
from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance
from mlxkt.kernels.probe import relative_error
from mlxkt.layers.moe import DeepseekMoE

emulated = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")


def problem(E, D, lead, dtype, seed=0):
    k = mx.random.split(mx.random.key(seed), 3)
    h = (4 * mx.random.normal((*lead, D), key=k[0])).astype(dtype)
    w = (mx.random.normal((E, D), key=k[1]) / math.sqrt(D)).astype(dtype)
    norm = nn.RMSNorm(D, eps=1e-6)
    norm.weight = (1 + 0.3 * mx.random.normal((D,), key=k[2])).astype(dtype)
    return h, w, norm


def check(backend, E, D, lead, dtype, tol):
    h, w, norm = problem(E, D, lead, dtype, seed=E + D)
    logits, xn = gate_norm.gate_norm(h, w, norm, backend)
    assert logits.shape == (*lead, E) and logits.dtype == mx.float32
    assert xn.shape == h.shape and xn.dtype == dtype
    norm32 = nn.RMSNorm(D, eps=norm.eps)
    norm32.weight = norm.weight.astype(mx.float32)
    want_logits, want_xn = gate_norm.reference(h, w, norm32)
    for name, a, b in (("logits", logits, want_logits), ("xn", xn, want_xn)):
        assert not np.isnan(np.array(a.astype(mx.float32))).any(), name  # all written
        assert relative_error(a, b) < tol, (name, relative_error(a, b))
    return h, w, norm, logits, xn


@emulated
@pytest.mark.parametrize("E,D,lead", [
    (8, 256, (1,)),
    (7, 132, (1, 1)),      # a block with one row past E; 33 quads over 128 threads
    (6, 4096, (3,)),       # 8 quads per thread; more blocks' worth of xn than blocks
    (32, 64, (1, 2)),      # 16 blocks, most write no xn
])
def test_emulated_kernel_matches_the_float32_reference(E, D, lead):
    check("cpu", E, D, lead, mx.float32, 1e-5)


@emulated
def test_emulated_kernel_reads_bfloat16():
    """bf16 h, W and g read as raw bits (the emulation computes in float32: its xn is not
    rounded in steps as on a GPU, the GPU test checks that)."""
    check("cpu", 5, 512, (2,), mx.bfloat16, probe_tolerance(mx.bfloat16))


def moe_args(**kw):
    base = dict(model_type="deepseek_v3", hidden_size=64, moe_intermediate_size=32,
                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=2.5, vocab_size=32,
                num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, intermediate_size=64)
    return ModelArgs.from_dict({**base, **kw})


@emulated
def test_moe_block_takes_the_norm_into_the_kernel(monkeypatch):
    """DeepseekMoE(h, norm=...) routes and computes the experts as moe(norm(h)), with the norm
    and logits from the kernel (the emulated one here; the router kernel too)."""
    for mod in (gate_norm, router):
        monkeypatch.setattr(mod, "gpu_backend", lambda: "cpu")
    monkeypatch.setenv(gate_norm.ENV, "1")
    gate_norm.ready.cache_clear()
    calls = []
    real = gate_norm.gate_norm
    monkeypatch.setattr(gate_norm, "gate_norm",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    moe = DeepseekMoE(moe_args())
    moe.gate.weight = mx.random.normal(moe.gate.weight.shape, key=mx.random.key(1)) / 8
    moe.gate.e_score_correction_bias = 0.1 * mx.random.normal((8,), key=mx.random.key(2))
    norm = nn.RMSNorm(64)
    norm.weight = 1 + 0.3 * mx.random.normal((64,), key=mx.random.key(3))
    h = 3 * mx.random.normal((1, 1, 64), key=mx.random.key(4))
    try:
        with mx.stream(mx.cpu):
            fused = moe(h, residual=h, norm=norm)
            moe.gate_norm = False  # the two steps, as before
            plain = moe(h, residual=h, norm=norm)
            unfolded = h + moe(norm(h))
    finally:
        gate_norm.ready.cache_clear()
    assert (1, 1, 64) in calls  # the layer's call (the probe's is [N, D])
    assert relative_error(fused, unfolded) < 1e-5
    assert relative_error(plain, unfolded) < 1e-6


@emulated
def test_selftest_rows_on_the_emulation():
    rows = gate_norm.selftest("cpu", echo=lambda *a: None, tokens=(1,), experts=4, dims=64)
    assert [r["status"] for r in rows] == ["pass"]


def test_on_only_when_asked_and_on_a_gpu(monkeypatch):
    monkeypatch.delenv(gate_norm.ENV, raising=False)
    monkeypatch.setattr(gate_norm, "gpu_backend", lambda: "cuda")
    assert gate_norm.backend_for() is None  # the default: off (no gain measured)
    assert gate_norm.backend_for(True) == "cuda"
    monkeypatch.setenv(gate_norm.ENV, "1")
    assert gate_norm.backend_for() == "cuda" and gate_norm.backend_for(False) is None
    monkeypatch.setattr(gate_norm, "gpu_backend", lambda: None)
    assert gate_norm.backend_for() is None
    monkeypatch.setattr(gate_norm, "gpu_backend", lambda: "metal")
    monkeypatch.setenv(dispatch.ENV, "0")  # all kernels off
    assert gate_norm.backend_for(True) is None


def test_unsupported_calls_say_why():
    h, w, norm = problem(4, 64, (1,), mx.float32)
    assert gate_norm.unsupported(h, w, norm) == ""
    assert gate_norm.unsupported(h, w, nn.LayerNorm(64)) == "not a plain RMSNorm"
    assert gate_norm.unsupported(h[..., :62], w[:, :62], nn.RMSNorm(62)) == "widths"
    assert gate_norm.unsupported(mx.zeros((9, 64)), w, norm) == "more tokens than a decode step"


# --- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("lead", [(1, 1), (1, 3)])
def test_gpu_kernel_at_deepseek_v3_widths(lead):
    """256 experts over 7168 inputs, bf16: logits as close to float32 as MLX's bf16 ops, xn
    as MLX's RMSNorm rounds it."""
    h, w, norm, logits, xn = check(gpu_backend(), 256, 7168, lead, mx.bfloat16,
                                   probe_tolerance(mx.bfloat16))
    norm32 = nn.RMSNorm(7168, eps=norm.eps)
    norm32.weight = norm.weight.astype(mx.float32)
    want_logits, _ = gate_norm.reference(h, w, norm32)
    native = norm(h) @ w.T
    assert relative_error(logits, want_logits) <= relative_error(native, want_logits) + 1e-6
    # Rounded as MLX's RMSNorm rounds (the normalised value, then its product with g); an
    # element may still differ where the float32 sums of squares round differently.
    same = np.mean(np.array(xn.astype(mx.float32)) == np.array(norm(h).astype(mx.float32)))
    assert same > 0.99
