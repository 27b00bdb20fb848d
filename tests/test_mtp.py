"""MTP speculative decoding: exactness for greedy and sampling, accept/trim machinery."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxkt.generate import generate_step
from mlxkt.sampling import Sampling
from mlxkt.speculative import SpecStats, _verify, queue_ahead
from tiny_models import attach_random_mtp, deepseek_tiny

PROMPT = mx.array([5, 17, 99, 42, 7, 250, 31, 8, 19])


@pytest.fixture(scope="module")
def model():
    return attach_random_mtp(deepseek_tiny())


@pytest.fixture(params=["1", "0"], ids=["ahead", "not-ahead"])
def ahead(request, monkeypatch):
    """Both cycle schedules: the next cycle queued before this one is read back, or not."""
    monkeypatch.setenv("MLXKT_MTP_AHEAD", request.param)
    assert queue_ahead() == (request.param == "1")


def test_queue_ahead_default_on_cpu_only(monkeypatch):
    monkeypatch.delenv("MLXKT_MTP_AHEAD", raising=False)
    assert queue_ahead() == (mx.default_device() == mx.cpu)


def plain_greedy(model, prompt, n):
    return [t for t, *_ in generate_step(prompt, model, max_tokens=n, mtp=False)]


@pytest.mark.parametrize("draft_tokens", [1, 2, 3])
def test_greedy_identical_to_plain(model, ahead, draft_tokens, cpu_device):
    plain = plain_greedy(model, PROMPT, 24)
    st = SpecStats()
    spec = [t for t, *_ in generate_step(PROMPT, model, max_tokens=24, draft_tokens=draft_tokens,
                                         spec_stats=st)]
    assert spec == plain
    assert st.cycles > 0 and st.drafted == st.cycles * draft_tokens


def test_chunked_prefill_with_mtp(model):
    prompt = mx.array(np.random.default_rng(0).integers(4, 300, 30))
    a = [t for t, *_ in generate_step(prompt, model, max_tokens=10)]
    b = [t for t, *_ in generate_step(prompt, model, max_tokens=10, prefill_step_size=7)]
    assert a == b == plain_greedy(model, prompt, 10)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_stepwise_short_prefill_with_mtp(model, monkeypatch, n):
    prompt = mx.array(np.random.default_rng(n).integers(4, 300, n))
    monkeypatch.setenv("MLXKT_STEPWISE_PREFILL", "1")
    assert [t for t, *_ in generate_step(prompt, model, max_tokens=10)] == plain_greedy(model, prompt, 10)


class OracleMTP:
    """Wraps the MTP layer: keeps its cache in step but drafts from a known sequence."""

    def __init__(self, layer, sequence, vocab, wrong=lambda pos: False):
        self.layer, self.seq, self.vocab, self.wrong = layer, sequence, vocab, wrong

    def __call__(self, h, next_tokens, cache):
        _, x = self.layer(h, next_tokens, cache)
        L = next_tokens.shape[1]
        logits = np.full((1, L, self.vocab), -10.0, np.float32)
        for r in range(L):
            pos = cache.offset - L + r  # this row predicts the token at pos + 2
            target = self.seq[pos + 2] if pos + 2 < len(self.seq) else 0
            logits[0, r, (target + 1) % self.vocab if self.wrong(pos) else target] = 10.0
        return mx.array(logits), x


@pytest.mark.parametrize("mode", ["right", "wrong", "mixed"])
def test_oracle_drafts(model, ahead, mode, cpu_device):
    n = 20
    plain = plain_greedy(model, PROMPT, n + 4)
    seq = PROMPT.tolist() + plain
    wrong = {"right": lambda p: False, "wrong": lambda p: True, "mixed": lambda p: p % 3 == 0}[mode]
    oracle = OracleMTP(model.mtp.layers[0], seq, model.args.vocab_size, wrong)
    real = model.mtp.layers[0]
    model.mtp.layers[0] = oracle
    try:
        st = SpecStats()
        spec = [t for t, *_ in generate_step(PROMPT, model, max_tokens=n, draft_tokens=2,
                                             spec_stats=st)]
    finally:
        model.mtp.layers[0] = real
    assert spec == plain[:n]
    if mode == "right":
        assert st.accepted == st.drafted and st.mean_accepted_length == 3.0
    elif mode == "wrong":
        assert st.accepted == 0 and st.cycles == n - 1
    else:
        assert 0 < st.accepted < st.drafted


def test_verify_greedy_prefixes():
    V = 6
    lps = mx.log(mx.softmax(mx.array(np.eye(V)[[2, 4, 1]] * 5.0, mx.float32), axis=-1))
    g = Sampling()
    acc, tok = _verify(lps, mx.array([2, 4]), g)
    assert acc.tolist() == [True, True] and tok.tolist() == [2, 4, 1]
    acc, tok = _verify(lps, mx.array([3, 4]), g)
    assert acc.tolist()[0] is False and tok.tolist()[0] == 2
    acc, tok = _verify(lps, mx.array([2, 0]), g)
    assert acc.tolist() == [True, False] and tok.tolist()[1] == 4


@pytest.mark.parametrize("sampling", [Sampling(temp=1.0), Sampling(temp=0.7, top_p=0.9)])
def test_speculative_sampling_matches_target(sampling):
    # First emitted token: draft d accepted w.p. p(d), else a sample from p without d.
    rng = np.random.default_rng(0)
    lp = mx.array(np.log(rng.dirichlet(np.ones(5) * 2))[None].repeat(2, 0).astype(np.float32))
    target = np.exp(np.array(sampling.target_logprobs(lp[0])))
    mx.random.seed(0)
    n = 3000
    counts = np.zeros(5)
    for d in (0, 3):  # a likely and an unlikely draft must both give p
        draws = []
        for _ in range(n // 500):  # build 500 lazy draws per eval: far fewer syncs
            batch = mx.stack([_verify(lp, mx.array([d]), sampling)[1][0] for _ in range(500)])
            mx.eval(batch)
            draws.append(batch)
        got = np.bincount(np.array(mx.concatenate(draws)), minlength=5) / n
        assert np.abs(got - target).max() < 0.035, (d, got, target)
        counts += got
    assert counts.sum() == pytest.approx(2.0)


def test_caches_stay_in_step_and_reusable(model, ahead):
    cache = model.make_cache()
    out = [t for t, *_ in generate_step(PROMPT, model, max_tokens=7, prompt_cache=cache)]
    offsets = {c.offset for c in cache}
    assert offsets == {PROMPT.size + 7 - 1}
    # Continue from the cache with the last emitted token: same as one long greedy run.
    more = [t for t, *_ in generate_step(mx.array(out[-1:]), model, max_tokens=5, prompt_cache=cache)]
    assert out + more == plain_greedy(model, PROMPT, 12)


FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dsv3-code-tiny"

HELD_OUT = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "held_out.py.txt").read_text()


@pytest.mark.skipif(not FIXTURE.exists(), reason="../shared/fixtures absent")
def test_trained_fixture_acceptance(tmp_path):
    from mlxkt import load
    from mlxkt.convert import convert

    dst = convert(FIXTURE / "bf16", tmp_path / "mlx", quantize=False, dtype="float32", progress=False)
    model, tok = load(dst)
    assert "mtp" in model
    prompt = mx.array(tok.encode(HELD_OUT))
    plain = [t for t, *_ in generate_step(prompt, model, max_tokens=64, mtp=False)]
    st = SpecStats()
    spec = [t for t, *_ in generate_step(prompt, model, max_tokens=64, spec_stats=st)]
    print(f"\ndsv3-code-tiny MTP acceptance {st.acceptance:.3f}, "
          f"mean accepted length {st.mean_accepted_length:.2f}")
    assert spec == plain
    assert st.acceptance >= 0.65


def test_chat_session_with_mtp_matches_plain(model, tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlxkt.chat import ChatSession, encode, render
    from mlxkt.demo import write_tokenizer

    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    s = ChatSession(model, tok)
    first = "".join(r.text for r in s.ask("hi there", 8))
    second = [r.token for r in s.ask("and again", 8)]
    assert {c.offset for c in s.cache} == {len(s.cached)}
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "and again"}]
    prompt = mx.array(encode(tok, render(tok, msgs)))
    assert second == [t for t, *_ in generate_step(prompt, model, max_tokens=8, mtp=False)]


def test_closing_early_keeps_every_emitted_token_but_the_last(model, ahead):
    cache = model.make_cache()
    g = generate_step(PROMPT, model, max_tokens=20, prompt_cache=cache)
    got = [next(g)[0] for _ in range(7)]
    g.close()
    assert {c.offset for c in cache} == {PROMPT.size + 7 - 1}
    assert got == plain_greedy(model, PROMPT, 7)


def test_max_tokens_zero_and_one(model):
    assert list(generate_step(PROMPT, model, max_tokens=0)) == []
    assert [t for t, *_ in generate_step(PROMPT, model, max_tokens=1)] == plain_greedy(model, PROMPT, 1)
