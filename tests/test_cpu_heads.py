"""MLA attention variants give the plain result: heads spread over CPU streams
(layers/cpu_heads.py), and 2 or more query rows as explicit matmul + softmax (the CUDA
default)."""

import mlx.core as mx
import pytest

from mlxkt.demo import DEMO_CONFIG
from mlxkt.layers import cpu_heads
from tiny_models import random_model

S = cpu_heads.MIN_KEYS + 37


@pytest.fixture
def attn():
    return random_model(DEMO_CONFIG).model.layers[0].self_attn


def inputs(attn, L, per_head_kv):
    H, r, rope = attn.num_heads, attn.kv_lora_rank, attn.qk_rope_head_dim
    dq = attn.qk_nope_head_dim if per_head_kv else r
    key = iter(mx.random.split(mx.random.key(L), 5))
    q = mx.random.normal((1, H, L, dq), key=next(key))
    q_pe = mx.random.normal((1, H, L, rope), key=next(key)) * attn.scale
    kv_heads = H if per_head_kv else 1
    k = mx.random.normal((1, kv_heads, S, dq), key=next(key))
    v = mx.random.normal((1, kv_heads, S, attn.unembed_out.weight.shape[1] if per_head_kv else r), key=next(key))
    k_pe = mx.random.normal((1, 1, S, rope), key=next(key))
    mask = mx.arange(S)[None] <= (S - L + mx.arange(L))[:, None] if L > 1 else None  # causal
    return q, q_pe, k, v, k_pe, mask


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU streams: only on the CPU device")
@pytest.mark.parametrize("L,per_head_kv", [(1, False), (2, False), (20, True)])
@pytest.mark.parametrize("streams", ["2", "3"])
def test_split_heads_equal_one_stream(attn, monkeypatch, L, per_head_kv, streams):
    monkeypatch.setenv(cpu_heads.ENV, streams)
    args = inputs(attn, L, per_head_kv)
    got = cpu_heads.split_heads(attn.attend_heads, *args)
    want = attn.attend_heads(*args)
    assert got is not None and got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-6, rtol=1e-6).item()
    assert mx.allclose(attn.attend(*args), want, atol=1e-6, rtol=1e-6).item()


def test_no_split_where_it_does_not_pay(attn, monkeypatch):
    monkeypatch.setenv(cpu_heads.ENV, "2")
    q, q_pe, k, v, k_pe, mask = inputs(attn, 1, False)
    short = [t[:, :, : cpu_heads.MIN_KEYS - 1] for t in (k, v, k_pe)]
    assert cpu_heads.split_heads(attn.attend_heads, q, q_pe, *short, mask) is None
    monkeypatch.setenv(cpu_heads.ENV, "1")
    assert cpu_heads.split_heads(attn.attend_heads, q, q_pe, k, v, k_pe, mask) is None
    monkeypatch.delenv(cpu_heads.ENV)
    assert cpu_heads.cpu_streams() in (1, 2)


def test_model_decode_over_a_long_cache_is_unchanged(monkeypatch):
    model = random_model(DEMO_CONFIG)
    prompt = mx.random.randint(0, DEMO_CONFIG["vocab_size"], (1, S), key=mx.random.key(1))

    def logits(streams):
        monkeypatch.setenv(cpu_heads.ENV, streams)
        cache = model.make_cache()
        model(prompt, cache=cache)
        return mx.concatenate([model(mx.array([[t]]), cache=cache) for t in (3, 9, 4)], axis=1)

    assert mx.allclose(logits("2"), logits("1"), atol=1e-5, rtol=1e-5).item()


@pytest.mark.parametrize("L,per_head_kv", [(2, False), (5, False), (16, False), (40, True)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_explicit_attention_equals_fused(attn, monkeypatch, L, per_head_kv, dtype):
    """Decode-sized rows over the latent and prefill rows over per-head keys. On the CPU both
    are the same ops (scale and mask wiring); on CUDA the fused side is cuDNN, which keeps
    the scores in float32."""
    args = [a.astype(dtype) if a.dtype != mx.bool_ else a for a in inputs(attn, L, per_head_kv)]
    monkeypatch.setenv("MLXKT_EXPLICIT_ATTENTION", "0")
    want = attn.attend_heads(*args).astype(mx.float32)
    monkeypatch.setenv("MLXKT_EXPLICIT_ATTENTION", "1")
    got = attn.attend_heads(*args).astype(mx.float32)
    assert got.shape == want.shape
    tol = 1e-5 if dtype == mx.float32 else 5e-2
    assert mx.allclose(got, want, atol=tol, rtol=tol).item()


def test_explicit_prefill_only_while_its_scores_are_small(attn, monkeypatch):
    from mlxkt.layers import mla

    monkeypatch.setenv("MLXKT_EXPLICIT_ATTENTION", "1")
    H = attn.num_heads
    assert not attn.explicit_rows(H, 1, 100)  # one row: MLX's own decode kernels
    assert attn.explicit_rows(H, 16, 1 << 30)  # decode-sized rows: always
    assert attn.explicit_rows(H, 512, mla.EXPLICIT_MAX_SCORES // (512 * H))
    assert not attn.explicit_rows(H, 512, mla.EXPLICIT_MAX_SCORES // (512 * H) + 1)
    attn.explicit_prefill = False  # the bench variant sdpa-prefill
    assert not attn.explicit_rows(H, 40, 100) and attn.explicit_rows(H, 16, 100)
    monkeypatch.setenv("MLXKT_EXPLICIT_ATTENTION", "0")
    attn.explicit_prefill = None
    assert not attn.explicit_rows(H, 40, 100) and not attn.explicit_rows(H, 2, 100)


@pytest.mark.parametrize("explicit", ["0", "1"])
def test_prefill_attention_in_row_blocks_is_unchanged(attn, monkeypatch, explicit, cpu_device):
    """Prefill rows whose scores pass EXPLICIT_MAX_SCORES run in blocks of rows that fit it,
    each on the explicit path where that is on; the output is the one-block result."""
    from mlxkt.layers import mla

    monkeypatch.setenv("MLXKT_EXPLICIT_ATTENTION", explicit)
    args = inputs(attn, 40, True)
    want = attn.attend(*args)
    H = attn.num_heads
    monkeypatch.setattr(mla, "EXPLICIT_MAX_SCORES", 12 * H * S)  # blocks of 12, 12, 12, 4 rows
    calls = []
    plain = attn.attend
    monkeypatch.setattr(attn, "attend", lambda *a: calls.append(
        (a[0].shape[2], attn.explicit_rows(H, a[0].shape[2], S))) or plain(*a))
    got = attn.attend_rows(*args)
    assert calls == [(12, explicit == "1")] * 3 + [(4, explicit == "1")]
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item()


def test_model_prefill_with_row_blocks_is_unchanged(monkeypatch, cpu_device):
    # on the CPU device: float32 GPU matmuls (TF32) round differently per block shape
    from mlxkt.layers import mla

    model = random_model(DEMO_CONFIG)
    prompt = mx.random.randint(0, DEMO_CONFIG["vocab_size"], (1, 70), key=mx.random.key(2))

    def logits():
        cache = model.make_cache()
        a = model(prompt[:, :30], cache=cache)  # the second chunk's mask is [40, 70]
        return mx.concatenate([a, model(prompt[:, 30:], cache=cache)], axis=1)

    want = logits()
    H = model.model.layers[0].self_attn.num_heads
    monkeypatch.setattr(mla, "EXPLICIT_MAX_SCORES", 7 * H * 70)
    assert mx.allclose(logits(), want, atol=1e-4, rtol=1e-4).item()
