"""The MLA decode attention kernels (metal/mla_partial.inc, mla_reduce.inc) and their use in
the attention layer. The kernel bodies run on the CPU through the C++ emulation (the same
source as the Metal and CUDA kernels); the `gpu` tests run the real kernels.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxkt.demo import DEMO_CONFIG
from mlxkt.kernels import emulate, mla_decode
from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance
from mlxkt.kernels.mla_decode import decode_meta, launch_config, random_problem, scale_array
from mlxkt.kernels.probe import relative_error
from mlxkt.layers import decode_compile
from mlxkt.layers import mla as mla_layer
from tiny_models import random_model

emulated = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")


def float64_reference(q, q_pe, kv, kpe, S, scale):
    """The attention in numpy float64 (MLX's float32 matmul may use TF32 on a GPU)."""
    q, q_pe, kv, kpe = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (q, q_pe, kv, kpe))
    k, kp = kv[:, :, :S], kpe[:, :, :S]
    s = scale * q @ k.swapaxes(-1, -2) + q_pe @ kp.swapaxes(-1, -2)  # [B, H, 1, S]
    p = np.exp(s - s.max(-1, keepdims=True))
    return mx.array((p / p.sum(-1, keepdims=True)) @ k)


def run(backend, B, H, R, P, rows, S, dtype=mx.float32, **cfg):
    q, q_pe, kv, kpe = [a.astype(dtype) for a in random_problem(B, H, R, P, rows, seed=rows + S)]
    scale = 0.7 / math.sqrt(R)
    meta = decode_meta(S, rows, H, **cfg)
    y = mla_decode.mla_decode(q, q_pe, kv, kpe, meta, scale_array(scale), backend, **cfg)
    return y, float64_reference(q, q_pe, kv, kpe, S, scale)


@emulated
@pytest.mark.parametrize("B,H,R,P,rows,S,cfg", [
    (1, 4, 64, 32, 100, 77, {}),              # keys end inside a tile
    (2, 6, 96, 16, 70, 70, {"hg": 3, "nw": 2}),  # two sequences, head groups of 3
    (1, 16, 512, 64, 300, 257, {}),           # DeepSeek's latent and rope widths
    (1, 8, 40, 8, 64, 1, {"nw": 1}),          # one key; widths that are not multiples of 32
    (1, 4, 64, 64, 2048, 40, {}),             # most splits hold no key at all
    (1, 4, 64, 32, 600, 555, {"kpt": 2, "blocks": 8}),  # 2 keys per thread, 3 tiles a split
    (1, 8, 1056, 8, 50, 50, {"nw": 2}),       # several latent slices per thread
])
def test_emulated_kernels_match_reference(B, H, R, P, rows, S, cfg):
    y, ref = run("cpu", B, H, R, P, rows, S, **cfg)
    assert y.shape == (B, H, 1, R)
    assert not np.isnan(np.array(y)).any()  # the emulation poisons unwritten outputs
    assert relative_error(y, ref) < 2e-6


@emulated
def test_emulated_kernels_take_bfloat16():
    y, ref = run("cpu", 1, 4, 64, 32, 90, 90, dtype=mx.bfloat16)
    assert y.dtype == mx.bfloat16
    assert relative_error(y, ref) < probe_tolerance(mx.bfloat16)


@pytest.mark.parametrize("rows", [1, 31, 256, 1280, 4096, 33024])
@pytest.mark.parametrize("H,hg", [(128, 8), (16, 8), (6, 3)])
@pytest.mark.parametrize("nw,kpt", [(4, 1), (8, 2)])
def test_splits_cover_the_buffer_in_whole_tiles(rows, H, hg, nw, kpt):
    cfg = launch_config(rows, H, hg=hg, nw=nw, kpt=kpt, blocks=512)
    kb, ns = cfg["kb"], cfg["ns"]
    assert kb % (32 * nw * kpt) == 0
    assert (ns - 1) * kb < rows <= ns * kb  # every row in one split, no empty split at the end
    assert ns * (H // hg) <= 2 * 512  # about the targeted number of blocks


def test_plain_path_matches_reference(cpu_device):  # float32 GPU matmuls may use TF32
    """plain_attention (the engine's ops without the kernels) is what the bench compares with."""
    q, q_pe, kv, kpe = random_problem(1, 4, 64, 32, 300, seed=3)
    y = mla_decode.plain_attention(q, q_pe, kv, kpe, 250, 0.1)
    assert relative_error(y, float64_reference(q, q_pe, kv, kpe, 250, 0.1)) < 1e-5


@emulated
def test_selftest_rows_on_the_emulation():
    rows = mla_decode.selftest("cpu", echo=lambda *a: None, contexts=(40,), heads=8)
    assert [r["status"] for r in rows] == ["pass"]
    assert rows[0]["kernel_us"] > 0 and rows[0]["plain_us"] > 0


def test_heads_per_block():
    assert [mla_decode.heads_per_block(h) for h in (128, 16, 6, 7, 1)] == [8, 8, 6, 7, 1]


def test_backend_policy(monkeypatch):
    monkeypatch.delenv(mla_decode.ENV, raising=False)
    monkeypatch.delenv(mla_decode.MAX_KEYS_ENV, raising=False)
    pick = mla_layer.decode_kernel_backend
    for backend in ("cuda", "metal", None):
        monkeypatch.setattr(mla_layer, "gpu_backend", lambda b=backend: b)
        assert pick(None, 1000) is None  # off unless asked for
        assert pick(False, 1000) is None
        assert pick(True, 1000) == backend
    monkeypatch.setattr(mla_layer, "gpu_backend", lambda: "cuda")
    assert pick(True, mla_decode.CUDA_MAX_KEYS + 1) is None  # long caches: MLX's GEMMs
    monkeypatch.setenv(mla_decode.MAX_KEYS_ENV, "100000")
    assert pick(True, mla_decode.CUDA_MAX_KEYS + 1) == "cuda"
    monkeypatch.setenv(mla_decode.ENV, "1")
    assert pick(None, 10) == "cuda"
    assert pick(False, 10) is None  # the layer's own switch wins
    monkeypatch.setenv(mla_decode.ENV, "0")
    assert pick(None, 10) is None
    assert pick(True, 10) == "cuda"


def greedy_logits(model, steps=4):
    cache = model.make_cache()
    logits = model(mx.array([[5, 17, 99, 42, 7, 250, 31]]), cache=cache)[:, -1]
    out = [logits]
    for _ in range(steps):
        logits = model(logits.argmax(-1)[:, None], cache=cache)[:, -1]
        out.append(logits)
    return mx.stack(out)


@emulated
def test_model_decodes_the_same_through_the_emulated_kernels(monkeypatch):
    """Eager decode of a tiny DeepSeek-V3 with the kernels (emulated) against without."""
    monkeypatch.setattr(mla_layer, "gpu_backend", lambda: "cpu")
    monkeypatch.delenv(mla_decode.ENV, raising=False)
    mla_layer.decode_kernel_ready.cache_clear()
    calls = []
    real = mla_decode.mla_decode
    monkeypatch.setattr(mla_decode, "mla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with mx.stream(mx.cpu):  # on a GPU machine too: MLX's float32 GPU matmuls may use TF32
        model = random_model(DEMO_CONFIG)
        plain = greedy_logits(model)
        for layer in model.layers:
            layer.self_attn.mla_kernel = True
        try:
            fast = greedy_logits(model)
        finally:
            mla_layer.decode_kernel_ready.cache_clear()
    assert len(calls) == 1 + 4 * len(model.layers)  # the probe, then every 1-token step
    assert mx.array_equal(fast.argmax(-1), plain.argmax(-1))
    assert relative_error(fast, plain) < 1e-5


# --- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("rows,S", [(256, 1), (1280, 1025), (8448, 8200), (33024, 32768)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_gpu_kernels_at_deepseek_shapes(rows, S, dtype):
    y, ref = run(gpu_backend(), 1, 128, 512, 64, rows, S, dtype=dtype)
    assert relative_error(y, ref) < probe_tolerance(dtype)
    y2, _ = run(gpu_backend(), 1, 128, 512, 64, rows, S, dtype=dtype)
    assert mx.array_equal(y, y2)  # deterministic: no atomics


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
def test_gpu_kernels_two_sequences_and_odd_heads():
    y, ref = run(gpu_backend(), 2, 12, 96, 32, 600, 333, dtype=mx.float16)
    assert relative_error(y, ref) < probe_tolerance(mx.float16)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_model_decodes_the_same_with_the_kernels(monkeypatch, compiled):
    monkeypatch.delenv(mla_decode.ENV, raising=False)
    model = random_model(DEMO_CONFIG)
    decode_compile.set_compiled_decode(model, compiled)
    for layer in model.layers:
        layer.self_attn.mla_kernel = False
    plain = greedy_logits(model, steps=6)
    calls = []
    real = mla_decode.mla_decode
    monkeypatch.setattr(mla_decode, "mla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    for layer in model.layers:
        layer.self_attn.mla_kernel = True
    fast = greedy_logits(model, steps=6)
    assert calls  # traced (compiled) or called (eager) at least once
    assert mx.array_equal(fast.argmax(-1), plain.argmax(-1))
    assert relative_error(fast, plain) < 3e-3  # the plain path's float32 matmuls: TF32
