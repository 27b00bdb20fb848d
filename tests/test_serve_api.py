"""`mlxkt serve` through real clients on loopback: the `openai` and `ollama` packages (and raw
httpx where the wire format itself is checked), on the trained tiny DeepSeek-V3."""

import json

import httpx
import pytest

from test_serve_common import server, r1_server, MODEL, R1_MODEL, base_state, r1_state, serve  # noqa: F401 (fixtures)

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

EMOJI = 'EMOJI = ["😀", "🎉", "😀", "🎉", "😀", "🎉", "😀",'
CJK = 's = "日本語のテキスト 日本語のテキスト 日本語のテキスト 日本語'
CODE = "def load_model(path):"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url, timeout=120)


def chat_both(client, model, messages, **kw):
    """(non-streamed response, streamed text, streamed reasoning, stream chunks)"""
    full = client.chat.completions.create(model=model, messages=messages, **kw)
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    return full, text, reasoning, chunks


def test_models_and_health(server, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


@pytest.mark.parametrize("prompt", [CODE, EMOJI, CJK])
def test_chat_stream_equals_non_stream(oai, prompt):
    msgs = [{"role": "user", "content": prompt}]
    full, text, reasoning, chunks = chat_both(oai, MODEL, msgs, max_tokens=24, temperature=0)
    choice = full.choices[0]
    assert choice.message.content == text and text
    assert reasoning == "" and getattr(choice.message, "reasoning_content", None) is None
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [choice.finish_reason] == ["length"]
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
    assert usage_chunks[0].usage.completion_tokens == full.usage.completion_tokens == 24
    assert usage_chunks[0].usage.prompt_tokens == full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24


@pytest.mark.parametrize("prompt", [EMOJI, CJK])
def test_multibyte_characters_split_across_tokens(server, oai, oll, base_state, prompt):
    """The model writes characters whose UTF-8 bytes span several tokens: streamed pieces
    must still reassemble into exactly the non-streamed text."""
    kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    full = oai.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in oai.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full
    assert any(ord(ch) >= 0x2000 for ch in full)  # emoji / CJK / block characters made it through
    # Ollama raw generate returns the token ids: some are partial UTF-8 sequences alone.
    opts = {"temperature": 0, "num_predict": 24}
    got = oll.generate(model=MODEL, prompt=prompt, raw=True, options=opts)
    pieces = [c.response for c in oll.generate(model=MODEL, prompt=prompt, raw=True, options=opts, stream=True)]
    assert "".join(pieces) == got.response == full
    tok = base_state.tokenizer
    generated = got.context[len(tok.encode(prompt)):]
    assert len(generated) == 24
    assert any("\ufffd" in tok.decode([t]) for t in generated)  # token by token: broken
    assert "\ufffd" not in full  # streamed: whole characters only


def test_sse_wire_format(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": CODE}], "max_tokens": 5,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in first  # only with stream_options.include_usage


def test_completions_token_prompt_equals_text_prompt(oai, base_state):
    text = oai.completions.create(model=MODEL, prompt=CODE, max_tokens=16, temperature=0)
    ids = base_state.tokenizer.encode(CODE)
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == text.usage.prompt_tokens == len(ids)


def test_stop_strings_cut_output(oai):
    msgs = [{"role": "user", "content": CODE}]
    free = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=32, temperature=0)
    text = free.choices[0].message.content
    stop = text[12:17]  # somewhere in the middle, likely spanning tokens
    expected = text[: text.index(stop)]
    full, streamed, _, chunks = chat_both(oai, MODEL, msgs, max_tokens=32, temperature=0, stop=[stop, "\x00never"])
    assert full.choices[0].message.content == streamed == expected
    assert full.choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_seed_makes_sampling_reproducible(oai):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": CODE}], max_tokens=24, temperature=1.0)
    a = oai.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = oai.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b
    others = {oai.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert others - {a}  # other seeds sample something else


def test_prefix_cache_reused_on_next_turn(oai):
    """Turn 2 of a chat re-sends turn 1: its KV is reused, and the answer is unchanged."""
    # (Prompts whose answer starts with a space lose that space to the detokenizer, so the
    # re-sent answer tokenizes differently; this one does not.)
    turn1 = [{"role": "user", "content": "import os"}]
    r1 = oai.chat.completions.create(model=MODEL, messages=turn1, max_tokens=20, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "import sys"}]
    warm = oai.chat.completions.create(model=MODEL, messages=turn2, max_tokens=20, temperature=0)
    reused = warm.usage.prompt_tokens_details.cached_tokens
    assert reused > r1.usage.prompt_tokens + r1.usage.completion_tokens // 2
    oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    cold = oai.chat.completions.create(model=MODEL, messages=turn2, max_tokens=20, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens < 5  # only BOS/role tokens shared
    assert cold.choices[0].message.content == warm.choices[0].message.content


def test_prompt_longer_than_context_is_400_before_streaming(server, base_state):
    ctx = base_state.engine.context_length
    text = "x = 1\n" * (ctx // 2)
    n = len(base_state.tokenizer.encode(text))
    assert n > ctx
    for stream in (False, True):
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": text, "max_tokens": 4, "stream": stream})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded"
        assert str(n) in err["message"] and str(ctx) in err["message"]
    r = httpx.post(f"{server.url}/api/generate", timeout=60,
                   json={"model": MODEL, "prompt": text, "raw": True})
    assert r.status_code == 400 and str(ctx) in r.json()["error"]


def test_ollama_chat_and_generate(server, oll):
    msgs = [{"role": "user", "content": CODE}]
    opts = {"temperature": 0, "num_predict": 20}
    full = oll.chat(model=MODEL, messages=msgs, options=opts)
    parts = list(oll.chat(model=MODEL, messages=msgs, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == full.message.content
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    last = parts[-1]
    assert last.done_reason == full.done_reason == "length"
    assert last.eval_count == full.eval_count == 20
    assert last.prompt_eval_count == full.prompt_eval_count > 0
    assert last.eval_duration > 0 and last.prompt_eval_duration > 0
    assert last.total_duration >= last.eval_duration
    # The model's tag as `ollama list` shows it works too.
    gen = oll.generate(model=f"{MODEL}:latest", prompt=CODE, options=opts)
    gen_parts = list(oll.generate(model=MODEL, prompt=CODE, options=opts, stream=True))
    assert "".join(p.response for p in gen_parts) == gen.response
    assert gen.response == full.message.content  # same template, same greedy answer
    assert gen.done and gen.context and len(gen.context) == gen.prompt_eval_count + 20


def test_ollama_load_requests(oll):
    """No prompt / no messages: Ollama's way to load a model; it is always loaded."""
    assert oll.generate(model=MODEL).done_reason == "load"
    assert oll.chat(model=MODEL, messages=[]).done_reason == "load"


def test_ollama_listing_endpoints(server, oll, base_state):
    names = [m.model for m in oll.list().models]
    assert names == [f"{MODEL}:latest"]
    shown = oll.show(MODEL)
    assert shown.details.family == "deepseek_v3" and shown.details.format == "mlx"
    assert shown.modelinfo["deepseek_v3.context_length"] == base_state.engine.context_length
    assert "completion" in shown.capabilities
    assert [m.model for m in oll.ps().models] == [f"{MODEL}:latest"]
    version = httpx.get(f"{server.url}/api/version").json()["version"]
    assert isinstance(version, str) and version


@pytest.mark.parametrize("name", ["other", "../../etc/passwd", "/tmp", "http://127.0.0.1:1/x"])
def test_model_must_be_the_loaded_one(server, oai, oll, name):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model=name, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError):
        oll.show(name)


def test_r1_reasoning_content(r1_server):
    """R1's template opens <think> in the prompt: what follows is reasoning_content, as in
    DeepSeek's API, and it is exactly what a raw completion of the rendered prompt gives."""
    client = openai.OpenAI(base_url=f"{r1_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": CODE}]
    full, text, reasoning, _ = chat_both(client, R1_MODEL, msgs, max_tokens=20, temperature=0)
    msg = full.choices[0].message
    assert msg.reasoning_content and msg.reasoning_content == reasoning
    assert msg.content == text
    tok = r1_server.state.tokenizer
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<think>\n")
    raw = client.completions.create(model=R1_MODEL, prompt=rendered, max_tokens=20, temperature=0)
    assert raw.choices[0].text == msg.reasoning_content + msg.content
    # Ollama clients get it as message.thinking.
    oll = ollama.Client(host=r1_server.url, timeout=120)
    res = oll.chat(model=R1_MODEL, messages=msgs, options={"temperature": 0, "num_predict": 20})
    assert res.message.thinking == msg.reasoning_content and res.message.content == msg.content


def test_frequency_penalty_applies_without_stale_cache(oai):
    msgs = [{"role": "user", "content": CODE}]
    plain = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0)
    kw = dict(model=MODEL, messages=msgs, max_tokens=40, temperature=0, frequency_penalty=2.0)
    a = oai.chat.completions.create(**kw)
    b = oai.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content != plain.choices[0].message.content
    # Penalties look at the whole prompt, so such requests do not start from a reused cache.
    assert b.usage.prompt_tokens_details.cached_tokens == 0
