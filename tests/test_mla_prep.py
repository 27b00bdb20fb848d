"""The MLA decode prologue kernel (metal/mla_prep.inc): latent norm, ropes, query copy and scale
in one launch. The body runs on the CPU through the C++ emulation; the `gpu` tests run the
real kernel at DeepSeek-V3's widths."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from mlxkt.kernels import emulate, mla_prep
from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance
from mlxkt.kernels.probe import relative_error

emulated = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")

YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def problem(B, L, H, nope, P, R, dtype, seed=0):
    k = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((B, L, H * (nope + P)), key=k[0]).astype(dtype)
    kv = (3 * mx.random.normal((B, L, R + P), key=k[1])).astype(dtype)
    norm = nn.RMSNorm(R, eps=1e-6)
    norm.weight = (1 + 0.3 * mx.random.normal((R,), key=k[2])).astype(dtype)
    return q, kv, norm


def float32(q, kv, norm):
    norm32 = nn.RMSNorm(norm.weight.shape[0], eps=norm.eps)
    norm32.weight = norm.weight.astype(mx.float32)
    return q.astype(mx.float32), kv.astype(mx.float32), norm32


def check(backend, B, L, H, nope, P, R, dtype, scaling, traditional, offset, tol):
    rope = initialize_rope(P, base=10000, traditional=traditional,
                           max_position_embeddings=163840, scaling_config=scaling)
    table = mla_prep.rope_table(rope, P)
    assert table is not None
    q, kv, norm = problem(B, L, H, nope, P, R, dtype, seed=L)
    got = mla_prep.mla_prep(q, kv, norm, offset, table, H, nope, P, 0.17, backend)
    want = mla_prep.reference(*float32(q, kv, norm), offset, rope, H, nope, P, 0.17)
    # One sequence: q_nope comes as [H, L, nope], the shape embed_q takes without broadcasts.
    assert got[0].shape == (want[0].shape[1:] if B == 1 else want[0].shape)
    got = (got[0].reshape(want[0].shape),) + tuple(got[1:])
    for name, a, b in zip(("q_nope", "q_pe", "latent", "k_pe"), got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert not np.isnan(np.array(a.astype(mx.float32))).any(), name  # all written
        assert relative_error(a, b) < tol, (name, relative_error(a, b))
    return got, want


@emulated
@pytest.mark.parametrize("B,L,scaling,traditional,offset", [
    (1, 1, None, True, 0),
    (1, 3, None, False, 17),
    (2, 2, YARN, True, 5000),     # YaRN: its own periods and input scale (mscale != 1)
    (1, 1, YARN, True, 100000),   # large angles
])
def test_emulated_kernel_matches_the_mlx_ops(B, L, scaling, traditional, offset):
    check("cpu", B, L, 3, 16, 8, 32, mx.float32, scaling, traditional, offset, 3e-5)


@emulated
def test_emulated_bfloat16_and_an_array_offset():
    q, kv, norm = problem(1, 2, 2, 8, 4, 16, mx.bfloat16)
    rope = nn.RoPE(4, traditional=True, base=10000)
    table = mla_prep.rope_table(rope, 4)
    got = mla_prep.mla_prep(q, kv, norm, mx.array(321), table, 2, 8, 4, 0.5, "cpu")
    want = mla_prep.reference(*float32(q, kv, norm), 321, rope, 2, 8, 4, 0.5)
    assert all(relative_error(a, b) < probe_tolerance(mx.bfloat16) for a, b in zip(got, want))


def test_rope_table_takes_deepseek_kinds_only():
    assert mla_prep.rope_table(nn.RoPE(64, traditional=True), 64) is not None
    yarn = mla_prep.rope_table(initialize_rope(64, 10000, True, YARN, 163840), 64)
    assert yarn is not None and yarn.mscale != 1.0
    assert mla_prep.rope_table(nn.RoPE(32), 64) is None  # partial rope
    llama3 = initialize_rope(64, 10000, False, {"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192}, 131072)
    assert mla_prep.rope_table(llama3, 64) is None


def test_unsupported_calls():
    q, kv, norm = problem(1, 1, 2, 8, 4, 16, mx.float32)
    assert mla_prep.unsupported(q, kv, norm, 2, 8, 4) == ""
    assert mla_prep.unsupported(q, kv, nn.LayerNorm(16), 2, 8, 4)
    assert mla_prep.unsupported(q, kv.astype(mx.bfloat16), norm, 2, 8, 4)
    big, _, _ = problem(1, 17, 2, 8, 4, 16, mx.float32)
    assert mla_prep.unsupported(big, kv, norm, 2, 8, 4)


def test_enabled_default_and_switch(monkeypatch):
    monkeypatch.delenv(mla_prep.ENV, raising=False)
    assert mla_prep.enabled("cuda") and not mla_prep.enabled("metal")
    monkeypatch.setenv(mla_prep.ENV, "1")
    assert mla_prep.enabled("metal") and not mla_prep.enabled(None)
    monkeypatch.setenv(mla_prep.ENV, "0")
    assert not mla_prep.enabled("cuda")


@emulated
def test_selftest_rows_on_the_emulation():
    rows = mla_prep.selftest("cpu", echo=lambda *a: None, tokens=(1,), heads=4)
    assert [(r["tokens"], r["status"]) for r in rows] == [(1, "pass")]


# --- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("L,scaling,offset", [(1, YARN, 1023), (1, None, 32767), (3, YARN, 4000)])
def test_gpu_kernel_at_deepseek_v3_widths(L, scaling, offset):
    """128 heads, 128 + 64 query dims, 512-wide latent, bf16: as close to float32 as MLX's own
    bf16 ops are."""
    got, want = check(gpu_backend(), 1, L, 128, 128, 64, 512, mx.bfloat16, scaling, True,
                      offset, probe_tolerance(mx.bfloat16))
    rope = initialize_rope(64, 10000, True, scaling, 163840)
    q, kv, norm = problem(1, L, 128, 128, 64, 512, mx.bfloat16, seed=L)
    native = mla_prep.reference(q, kv, norm, offset, rope, 128, 128, 64, 0.17)
    for a, n, b in zip(got, native, want):
        assert relative_error(a, b) <= 1.5 * relative_error(n, b) + 1e-6
