"""Decode attention over a padded key count (layers/key_padding.py): the extra cache rows
must get zero weight, whatever they hold."""

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlxkt.layers import key_padding
from mlxkt.layers.key_padding import padded_keys
from mlxkt.kernels.probe import relative_error


def filled_cache(S, R=16, P=4):
    cache = KVCache()
    cache.update_and_fetch(mx.random.normal((1, 1, S, R)), mx.random.normal((1, 1, S, P)))
    # Rows past the valid ones: large values, as stale entries after a trim might be.
    cache.keys[:, :, S:] = 1e4
    cache.values[:, :, S:] = -1e4
    return cache


def views(cache):
    S = cache.offset
    return cache.keys[:, :, :S], cache.values[:, :, :S]


def test_padded_keys_rounds_up_only_when_asked(monkeypatch):
    monkeypatch.delenv(key_padding.ENV, raising=False)
    cache = filled_cache(13)
    latent, k_pe = views(cache)
    lat, kp, valid = padded_keys(cache, latent, k_pe, forced=True)
    assert (lat.shape[2], kp.shape[2], valid) == (16, 16, 13)
    assert padded_keys(cache, latent, k_pe, forced=False)[2] is None
    assert padded_keys(cache, latent, k_pe, mask=mx.ones((1, 13)), forced=True)[2] is None
    assert padded_keys(cache, latent, k_pe)[2] is None  # auto: CUDA and long caches only
    monkeypatch.setenv(key_padding.ENV, "1")
    assert padded_keys(cache, latent, k_pe)[2] == 13
    aligned = filled_cache(16)
    assert padded_keys(aligned, *views(aligned), forced=True)[2] is None


def test_padded_attention_equals_the_exact_one():
    from tiny_models import deepseek_tiny

    attn = deepseek_tiny().layers[0].self_attn
    H, R, P = attn.num_heads, attn.kv_lora_rank, attn.qk_rope_head_dim
    cache = filled_cache(21, R, P)
    q, q_pe = mx.random.normal((1, H, 1, R)), mx.random.normal((1, H, 1, P))
    latent, k_pe = views(cache)
    exact = attn.attend(q, q_pe, latent, latent, k_pe)
    attn.pad_keys = True
    padded = attn.attend_padded(q, q_pe, cache, latent, k_pe)
    assert relative_error(padded, exact) < 1e-5


def test_model_decodes_the_same_with_padded_keys():
    from tiny_models import deepseek_tiny, greedy_logits

    model = deepseek_tiny()

    def greedy(pad):
        for layer in model.layers:
            layer.self_attn.pad_keys = pad
        return greedy_logits(model)

    assert relative_error(greedy(True), greedy(False)) < 1e-5
