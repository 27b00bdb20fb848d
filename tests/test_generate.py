"""Engine behaviour on random tiny models: caches, chunked prefill, absorbed MLA, stops."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from mlxkt.chat import ChatSession, encode, render
from mlxkt.demo import write_tokenizer
from mlxkt.generate import generate_step, prefill_chunks, stream_generate
from mlxkt.layers import mla
from tiny_models import deepseek_tiny, mixtral_tiny


@pytest.fixture(scope="module", params=["deepseek", "mixtral"])
def model(request):
    return deepseek_tiny() if request.param == "deepseek" else mixtral_tiny()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return load_tokenizer(d)


def greedy_without_cache(model, prompt, n):
    toks = list(prompt)
    for _ in range(n):
        logits = model(mx.array([toks]))[0, -1]
        toks.append(int(mx.argmax(logits)))
    return toks[len(prompt):]


def test_cached_decode_matches_full_recompute(model):
    prompt = [5, 17, 99, 42, 7, 250, 31]
    got = [t for t, *_ in generate_step(mx.array(prompt), model, max_tokens=12)]
    assert got == greedy_without_cache(model, prompt, 12)


def test_chunked_prefill_same_logits(model):
    prompt = mx.array(np.random.default_rng(1).integers(4, 300, 40))
    one = [t for t, *_ in generate_step(prompt, model, max_tokens=6)]
    chunked = [t for t, *_ in generate_step(prompt, model, max_tokens=6, prefill_step_size=7)]
    assert one == chunked


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 511, 512, 513, 528, 529, 1040, 1041])
@pytest.mark.parametrize("stepwise", [False, True])
def test_prefill_chunks_leave_no_decode_sized_tail(n, stepwise):
    chunks = prefill_chunks(n, 512, small=16, stepwise=stepwise)
    assert [s for s, _ in chunks] == [0] + [e for _, e in chunks[:-1]] if n else chunks == []
    assert (chunks[-1][1] if chunks else 0) == n
    assert all(e - s <= 512 + 16 for s, e in chunks)
    sizes = [e - s for s, e in chunks]
    if 1 < n <= 16:  # only a prompt that short has a decode-sized chunk: whole, or token by token
        assert sizes == ([1] * n if stepwise else [n])
    elif len(chunks) > 1:
        assert sizes[-1] > 16


@pytest.mark.parametrize("n", [2, 3, 9, 17])
def test_stepwise_short_prefill_same_tokens(model, monkeypatch, n):
    prompt = mx.array(np.random.default_rng(n).integers(4, 300, n))
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("MLXKT_STEPWISE_PREFILL", flag)
        out.append([t for t, *_ in generate_step(prompt, model, max_tokens=6)])
    assert out[0] == out[1]


def test_incremental_logits_close(model, cpu_device):  # float32 on a GPU rounds per batch size
    toks = mx.array(np.random.default_rng(2).integers(4, 300, (1, 24)))
    full = model(toks)
    cache = model.make_cache()
    model(toks[:, :20], cache=cache)
    steps = [model(toks[:, i : i + 1], cache=cache) for i in range(20, 24)]
    inc = mx.concatenate(steps, axis=1)
    assert mx.abs(inc - full[:, 20:]).max().item() < 1e-4


def test_absorbed_and_expanded_mla_agree(monkeypatch, cpu_device):  # exact math, no TF32
    model = deepseek_tiny()
    toks = mx.array(np.random.default_rng(3).integers(4, 300, (1, 20)))
    monkeypatch.setattr(mla, "ABSORB_MAX_L", 0)
    expanded = model(toks)
    monkeypatch.setattr(mla, "ABSORB_MAX_L", 10**6)
    absorbed = model(toks)
    assert mx.abs(expanded - absorbed).max().item() < 1e-4


def test_mla_cache_is_compressed():
    model = deepseek_tiny()
    cache = model.make_cache()
    model(mx.array([[5, 6, 7]]), cache=cache)
    a = model.args
    keys, values = cache[0].state[0], cache[0].state[1]
    assert keys.shape[1] == 1 and keys.shape[-1] == a.kv_lora_rank
    assert values.shape[1] == 1 and values.shape[-1] == a.qk_rope_head_dim


def test_stop_string_cuts_text(tokenizer):
    model = deepseek_tiny()
    full = "".join(r.text for r in stream_generate(model, tokenizer, "abc", max_tokens=20))
    assert len(full) > 4
    stop = full[3:5]
    cut = list(stream_generate(model, tokenizer, "abc", max_tokens=20, stop_strings=[stop]))
    text = "".join(r.text for r in cut)
    assert text == full[: full.find(stop)] and cut[-1].finish_reason == "stop"


def test_length_finish_and_stats(tokenizer):
    model = deepseek_tiny()
    rs = list(stream_generate(model, tokenizer, "hello", max_tokens=5))
    assert len(rs) == 5 and rs[-1].finish_reason == "length"
    assert rs[-1].generation_tokens == 5 and rs[-1].prompt_tokens == len(tokenizer.encode("hello"))


def test_chat_session_reuses_cache_and_matches_fresh(tokenizer):
    model = deepseek_tiny()
    s = ChatSession(model, tokenizer)
    first = "".join(r.text for r in s.ask("hi there", 8))
    cached_before = len(s.cached)
    second = [r.token for r in s.ask("and again", 8)]
    assert cached_before > 0
    # A fresh run over the whole rendered conversation must give the same tokens.
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "and again"}]
    fresh = [r.token for r in stream_generate(
        model, tokenizer, encode(tokenizer, render(tokenizer, msgs)), max_tokens=8)]
    assert second == fresh


def test_chat_session_survives_a_reply_abandoned_early(tokenizer):
    model = deepseek_tiny()
    s = ChatSession(model, tokenizer)
    for _ in s.ask("hello there", 10):
        break  # e.g. a stop button
    assert len(s.cached) == s.cache[0].offset
    second = [r.token for r in s.ask("and again", 6)]
    msgs = s.messages[:-1]  # the history as the session rendered it for the second turn
    fresh = [r.token for r in stream_generate(
        model, tokenizer, encode(tokenizer, render(tokenizer, msgs)), max_tokens=6)]
    assert second == fresh


def test_empty_prompt_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        next(stream_generate(deepseek_tiny(), tokenizer, [], max_tokens=3))


def test_prefill_step_default_and_override(monkeypatch):
    from mlxkt import generate
    from mlxkt.kernels.dispatch import gpu_backend

    monkeypatch.delenv("MLXKT_PREFILL_STEP", raising=False)
    want = generate.PREFILL_STEP_CUDA if gpu_backend() == "cuda" else generate.PREFILL_STEP
    assert generate.prefill_step() == want
    assert prefill_chunks(3000, small=16, stepwise=False)[0] == (0, want)
    monkeypatch.setenv("MLXKT_PREFILL_STEP", "100")
    assert prefill_chunks(250, small=16, stepwise=False) == [(0, 100), (100, 200), (200, 250)]
    for bad in ("0", "-5", "big"):
        monkeypatch.setenv("MLXKT_PREFILL_STEP", bad)
        with pytest.raises(ValueError, match="MLXKT_PREFILL_STEP"):
            generate.prefill_step()
