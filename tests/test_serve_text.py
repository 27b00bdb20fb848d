"""Unit tests of the server's pure parts: stop strings, <think> split, bind/Host rules,
prefix matching, request schemas. No model, no sockets."""

import random

import pytest

from mlxkt.server.errors import APIError
from mlxkt.server.prefix_cache import PrefixCache, common_prefix
from mlxkt.server.protocol import ChatCompletionRequest, OllamaChatRequest, parse_json, validate
from mlxkt.server.settings import ServerSettings, check_bind, is_loopback
from mlxkt.server.textstream import StopMatcher, ThinkSplitter


def random_pieces(text: str, rng: random.Random):
    """Splits text at random points (including empty pieces)."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, len(text))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def run_stop(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


@pytest.mark.parametrize("text,stops,expected,hit", [
    ("hello world. bye", ["."], "hello world", True),
    ("a\n\nb", ["\n\n"], "a", True),
    ("abcdef", ["cd", "b"], "a", True),                # earliest match wins
    ("abcdef", ["xyz"], "abcdef", False),
    ("ab", ["abc"], "ab", False),                      # a held prefix is released at the end
    ("日本語のテキスト😀end", ["😀"], "日本語のテキスト", True),
    ("no stops", [], "no stops", False),
])
def test_stop_matcher_any_split(text, stops, expected, hit):
    rng = random.Random(0)
    for _ in range(50):
        assert run_stop(stops, random_pieces(text, rng)) == (expected, hit)


def test_stop_matcher_never_emits_part_of_a_stop():
    m = StopMatcher(["</end>"])
    emitted = ""
    for ch in "text </en":
        emitted += m.feed(ch)[0]
    assert emitted == "text "  # "</en" is held back: it may become "</end>"


def split_all(pieces, in_thinking=False):
    s = ThinkSplitter(in_thinking)
    r, c = [], []
    for p in pieces:
        a, b = s.feed(p)
        r.append(a)
        c.append(b)
    a, b = s.flush()
    return "".join(r) + a, "".join(c) + b


@pytest.mark.parametrize("text,in_thinking,reasoning,content", [
    ("<think>\nplan it\n</think>\n\nThe answer.", False, "\nplan it\n", "The answer."),
    ("  <think>x</think>y", False, "x", "y"),
    ("just an answer <think> not a tag here", False, "", "just an answer <think> not a tag here"),
    ("R1 opened the tag in the prompt</think>\n\nAnswer", True, "R1 opened the tag in the prompt", "Answer"),
    ("never closed", True, "never closed", ""),
    ("<thin", False, "", "<thin"),                   # a prefix of the tag that never completes
    ("<think>😀思考</think>答え😀", False, "😀思考", "答え😀"),
])
def test_think_splitter_any_split(text, in_thinking, reasoning, content):
    rng = random.Random(1)
    for _ in range(50):
        assert split_all(random_pieces(text, rng), in_thinking) == (reasoning, content)


def test_check_bind_refuses_open_bind_without_key():
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("localhost", None, False)
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        with pytest.raises(ValueError, match="--api-key"):
            check_bind(host, None, False)
        check_bind(host, "secret", False)
        check_bind(host, None, True)


def test_host_rules():
    local = ServerSettings(model_name="m")
    assert local.host_allowed("127.0.0.1:8080") and local.host_allowed("localhost:1")
    assert local.host_allowed("[::1]:8080")
    assert not local.host_allowed("evil.example:8080")
    assert not local.host_allowed("")
    assert not local.host_allowed("127.0.0.1.evil.example")
    lan = ServerSettings(model_name="m", host="192.168.1.5", api_key="k")
    assert lan.host_allowed("192.168.1.5:8080") and not lan.host_allowed("evil.example")
    proxied = ServerSettings(model_name="m", allowed_hosts=("chat.example",))
    assert proxied.host_allowed("chat.example") and not proxied.host_allowed("other.example")
    assert is_loopback("127.0.0.2") and not is_loopback("10.0.0.1")


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


@pytest.mark.parametrize("step_back", [0, 1])
def test_prefix_cache_steps_back_for_mtp(step_back):
    from mlx_lm.models.cache import KVCache
    import mlx.core as mx

    def filled(n):
        cache = [KVCache(), KVCache()]  # e.g. one main layer and one MTP layer
        for c in cache:
            c.update_and_fetch(mx.zeros((1, 1, n, 4)), mx.zeros((1, 1, n, 2)))
        return cache

    pc = PrefixCache(lambda: filled(0), step_back=step_back)
    pc.store(filled(6), [1, 2, 3, 4, 5, 6])
    cache, n = pc.take([1, 2, 3, 4, 9, 9, 9])  # differs at position 4
    # the MTP entry at 3 paired h_3 with the old token 5: stepped back past it when asked
    assert n == 4 - step_back and all(c.offset == n for c in cache)
    pc.store(cache, [1, 2, 3, 4, 9, 9, 9][:n])
    cache, n2 = pc.take([1, 2, 3, 4, 9, 9, 9][:n] + [7, 8])  # only extends: nothing stale
    assert n2 == n


def test_parse_json_rejects_non_standard_and_broken_bodies():
    for raw in (b"", b"  ", b"[1]", b'"x"', b"{", b'{"a": NaN}', b'{"a": Infinity}', b"\xff",
                b'{"a": "\\ud800"}', b"[" * 100000):
        with pytest.raises(APIError) as e:
            parse_json(raw)
        assert e.value.status == 400
    assert parse_json('{"a": "日本"}'.encode()) == {"a": "日本"}


def test_schema_is_strict_and_bounded():
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert validate(ChatCompletionRequest, ok).stream is False
    for patch in ({"max_tokens": "10"}, {"max_tokens": True}, {"max_tokens": 0}, {"temperature": -0.1},
                  {"top_p": 0}, {"top_p": 1.5}, {"stop": [""]}, {"n": 2}, {"stream_options": {"include_usage": True}}):
        with pytest.raises(APIError) as e:
            validate(ChatCompletionRequest, {**ok, **patch})
        assert e.value.status == 400 and e.value.message
        assert not e.value.message.startswith("Value error")
    assert validate(OllamaChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]}).stream is True
