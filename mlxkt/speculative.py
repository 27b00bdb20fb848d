"""MTP speculative decoding: the model's own MTP layer drafts, one forward verifies.

Each cycle: the MTP layer drafts N tokens (argmax), the main model runs [y, d_1..d_N] in one
forward (few query tokens, so MLA stays on the absorbed path), the longest acceptable prefix
is kept, and one more token comes from the main model's own distribution. Greedy output is
identical to plain greedy decoding; with sampling, drafts are accepted with probability p(d)
and otherwise replaced by a sample from p with d removed, so the output follows p exactly.

Caches: model.make_cache() lists the main layers' caches, then the MTP layers'. MTP entry i
pairs h_i with token t_{i+1}, so at every cycle boundary both hold the same positions.
"""

from dataclasses import dataclass
from typing import Generator, List, Optional

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from .device import env_switch
from .sampling import Sampling


@dataclass
class SpecStats:
    cycles: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per main-model forward."""
        return (self.accepted + self.cycles) / max(self.cycles, 1)


def _logprobs(logits):
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _sample(lp: mx.array, sampling: Sampling) -> mx.array:
    """lp: [..., V] -> sampled token ids [...]."""
    if sampling.greedy:
        return mx.argmax(lp, axis=-1)
    return mx.random.categorical(sampling.target_logprobs(lp))


def _verify(lps: mx.array, drafts: mx.array, sampling: Sampling):
    """Accept/reject drafted tokens without leaving the graph.

    lps: [N+1, V] target logprobs at [y, d_1..d_N]; drafts: [N].
    -> accepted [N] bool, tokens [N+1]: at each position the token to emit if all before
    it were accepted (the draft itself when accepted, else a corrected sample; the last
    position is the bonus token).
    """
    N = drafts.size
    if sampling.greedy:
        tokens = mx.argmax(lps, axis=-1)
        return tokens[:N] == drafts, tokens
    p = sampling.target_logprobs(lps)  # [N+1, V]
    p_draft = mx.take_along_axis(p[:N], drafts[:, None], axis=-1)[:, 0]
    accepted = mx.random.uniform(shape=(N,)) < mx.exp(p_draft)
    # Rejected: sample from p with the draft removed (the residual of a point-mass draft).
    hit = mx.arange(p.shape[-1])[None] == drafts[:, None]
    resampled = mx.random.categorical(mx.where(hit, -float("inf"), p[:N]))
    tokens = mx.concatenate([mx.where(accepted, drafts, resampled), mx.random.categorical(p[N:])])
    return accepted, tokens


class _Cycle:
    """One draft + verify + MTP catch-up, queued on the device as a lazy graph."""

    def __init__(self, model, main, mcache, y, d_logits, d_h, N, sampling, queue=True):
        mtp = model.mtp.layers[0]
        # Draft N tokens (argmax); further drafts chain the MTP layer on its own output,
        # and those chained cache entries are dropped again once drafted.
        drafts = [mx.argmax(d_logits[0, -1])]
        for _ in range(N - 1):
            d_logits, d_h = mtp(d_h, drafts[-1].reshape(1, 1), mcache[0])
            drafts.append(mx.argmax(d_logits[0, -1]))
        trim_prompt_cache(mcache, N - 1)
        drafts = mx.stack(drafts)  # [N]
        # Verify [y, d_1..d_N] in one forward; the MTP layer catches up on the same positions
        # with the token that would follow each of them.
        h = model.model(mx.concatenate([y.reshape(1), drafts])[None], main)  # [1, N+1, D]
        self.lps = _logprobs(model.lm_head(h)[0])  # [N+1, V]
        self.accepted, self.tokens = _verify(self.lps, drafts, sampling)
        self.m_logits, self.m_h = mtp(h, self.tokens[None], mcache[0])
        if queue:  # False: graph only (benchmarks time the building)
            mx.async_eval(self.accepted, self.tokens, self.m_logits, self.m_h)

    def after(self, j: int):
        """(y, draft logits, draft hidden) for the cycle that follows acceptance of j drafts."""
        return self.tokens[j], self.m_logits[:, j : j + 1], self.m_h[:, j : j + 1]


def queue_ahead() -> bool:
    """Whether to queue the next cycle before this one is read back (MLXKT_MTP_AHEAD=1/0).

    Default: on the CPU only. On an H200 (dsv3-code-tiny, 89% acceptance) the cycle that a
    rejection throws away cost more GPU time than the wait saved: MTP decode 722 tok/s
    queued ahead, 810 without, same run. On this project's CPU queuing ahead won (146 vs
    131 tok/s, 96% acceptance)."""
    forced = env_switch("MLXKT_MTP_AHEAD")
    return mx.default_device() == mx.cpu if forced is None else forced


def mtp_generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampling: Sampling = Sampling(),
    prompt_cache: List = None,
    draft_tokens: int = 1,
    prefill_step_size: Optional[int] = None,
    stats: SpecStats = None,
) -> Generator:
    """Yield (token, logprobs, from_draft) like generate_step, drafting with model.mtp."""
    n_main = len(model.layers)
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    main, mcache = cache[:n_main], cache[n_main:]
    start = main[0].offset
    mtp = model.mtp.layers[0]
    stats = stats if stats is not None else SpecStats()
    ahead = queue_ahead()

    # Prefill: main model over the prompt; the MTP layer over the same positions, each
    # paired with the following token (the last one with the first sampled token y).
    from .generate import prefill_chunks  # generate imports this module

    P = prompt.size
    for s, e in prefill_chunks(P, prefill_step_size):
        h = model.model(prompt[None, s:e], main)  # [1, n, D]
        if e < P:
            mtp(h, prompt[None, s + 1 : e + 1], mcache[0])
            mx.eval([c.state for c in cache])
    lp = _logprobs(model.lm_head(h[:, -1])[0])
    y = _sample(lp, sampling)
    d_logits, d_h = mtp(h, mx.concatenate([prompt[s + 1 : e], y[None]])[None], mcache[0])
    d_logits, d_h = d_logits[:, -1:], d_h[:, -1:]
    y = y.item()

    n = 0
    N = draft_tokens
    try:
        if max_tokens == 0:
            return
        n += 1  # counted before each yield: a consumer may close the generator there
        yield y, lp, False
        if n == max_tokens:
            return
        cur = _Cycle(model, main, mcache, mx.array(y), d_logits, d_h, N, sampling)
        while max_tokens < 0 or n < max_tokens:
            # ahead: queue the next cycle as if every draft will be accepted, so the device
            # works while this cycle's tokens are read back; a rejection wastes that cycle.
            nxt = _Cycle(model, main, mcache, *cur.after(N), N, sampling) if ahead else None
            acc = cur.accepted.tolist()
            j = acc.index(False) if False in acc else N
            toks = cur.tokens.tolist()
            stats.cycles += 1
            stats.drafted += N
            stats.accepted += j
            if nxt is None or j < N:
                # Drop the queued cycle (if any) and the rejected drafts from both caches,
                # and queue the right cycle before handing out the tokens.
                drop = (N + 1 if nxt is not None else 0) + (N - j)
                trim_prompt_cache(main, drop)
                trim_prompt_cache(mcache, drop)
                nxt = _Cycle(model, main, mcache, *cur.after(j), N, sampling)
            for k in range(j + 1):
                n += 1
                yield toks[k], cur.lps[k], k < j
                if n == max_tokens:
                    return
            cur = nxt
    finally:
        # Keep exactly the prompt and the emitted tokens but the last (never fed back),
        # in both caches, so the cache can be reused for a following prompt.
        keep = min([start + P + max(n - 1, 0)] + [c.offset for c in cache])
        for c in cache:
            if c.offset > keep:
                c.trim(c.offset - keep)
