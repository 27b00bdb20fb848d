"""Generation: prefill and decode as explicit steps, streamed as mlx-lm's GenerationResponse."""

import os
import time
from typing import Callable, Generator, Iterable, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse

from .device import env_switch
from .kernels.dispatch import gpu_backend
from .layers.mla import ABSORB_MAX_L
from .sampling import Sampling
from .speculative import SpecStats, mtp_generate_step

PREFILL_STEP = 512  # prompt tokens per prefill chunk, bounding activation memory
PREFILL_STEP_CUDA = 2048


def prefill_step() -> int:
    """Prompt tokens per prefill chunk: MLXKT_PREFILL_STEP, else 2048 on CUDA (as mlx-lm
    everywhere) and 512 elsewhere. On CUDA bigger chunks give each routed expert more rows per
    launch: at DeepSeek-V3's 256 experts a 512-token chunk leaves each ~16 and 2048 prefilled
    4096 tokens 1.56x faster (H200). On the CPU 2048 was 0.90x: a chunk's attention is a full
    rows x keys rectangle, so fewer chunks compute more of it. MLAttention.attend_rows keeps
    the memory bounded either way."""
    forced = os.environ.get("MLXKT_PREFILL_STEP", "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"MLXKT_PREFILL_STEP={forced!r}: expected a number of tokens >= 1")
        return int(forced)
    return PREFILL_STEP_CUDA if gpu_backend() == "cuda" else PREFILL_STEP


def stepwise_short_chunks() -> bool:
    """Whether prefill chunks of 2-16 tokens run as 1-token steps: MLXKT_STEPWISE_PREFILL=1/0,
    else on CUDA. There every new decode-sized token count builds its kernels and traces on
    first use (a 6-token chunk: 44.7 s on an H200), while 1-token steps reuse decode's."""
    forced = env_switch("MLXKT_STEPWISE_PREFILL")
    return gpu_backend() == "cuda" if forced is None else forced


def prefill_chunks(n: int, step: Optional[int] = None, small: int = ABSORB_MAX_L,
                   stepwise: Optional[bool] = None) -> list:
    """[(start, end)] over n tokens in chunks of `step`, except that a short last chunk (of
    decode size, at most `small` tokens) joins the one before it. Only a prompt that short
    is then left with a decode-sized chunk, which `stepwise` splits into single tokens."""
    bounds = list(range(0, n, step or prefill_step())) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] <= small:
        del bounds[-2]
    if 1 < n <= small and (stepwise_short_chunks() if stepwise is None else stepwise):
        bounds = list(range(n + 1))
    return list(zip(bounds[:-1], bounds[1:]))


def prefill(model: nn.Module, tokens: mx.array, cache: list, step: Optional[int] = None):
    """Run all but the last prompt token through the model, filling the cache in chunks."""
    # tokens: [L] -> returns the last token [1] still to be decoded
    for s, e in prefill_chunks(tokens.size - 1, step):
        model(tokens[None, s:e], cache=cache)
        mx.eval([c.state for c in cache])
    return tokens[-1:]


def decode_step(model, tokens, cache, sampler, logits_processors=None, history=None):
    """One forward over `tokens` [L]; sample the next token from the last position."""
    logits = model(tokens[None], cache=cache)[:, -1, :]  # [1, vocab]
    if logits_processors:
        for p in logits_processors:
            logits = p(history, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs.squeeze(0)


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable] = None,
    sampling: Optional[Sampling] = None,
    logits_processors: Optional[List[Callable]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: Optional[int] = None,  # None: prefill_step()
    mtp: bool = True,
    draft_tokens: int = 1,
    spec_stats: Optional[SpecStats] = None,
) -> Generator:
    """Yield (token, logprobs, from_draft).

    Models with an MTP layer attached decode speculatively (exact for greedy and for
    `sampling`; a custom `sampler` or logits processors fall back to plain decoding).
    Plain decode is pipelined: step n+1 is queued before step n's token is read back.
    """
    if mtp and "mtp" in model and not logits_processors and (sampling or sampler is None):
        yield from mtp_generate_step(
            prompt, model, max_tokens=max_tokens, sampling=sampling or Sampling(),
            prompt_cache=prompt_cache, draft_tokens=draft_tokens,
            prefill_step_size=prefill_step_size, stats=spec_stats)
        return
    sampler = sampler or (sampling or Sampling()).sampler()
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    history = prompt if logits_processors else None
    y = prefill(model, prompt, cache, prefill_step_size)

    def step(y):
        nonlocal history
        tok, lp = decode_step(model, y, cache, sampler, logits_processors, history)
        if logits_processors:
            history = mx.concatenate([history, tok])
        return tok, lp

    y, logprobs = step(y)
    mx.async_eval(y, logprobs)
    n = 0
    while max_tokens < 0 or n < max_tokens:
        if n + 1 != max_tokens:
            next_y, next_lp = step(y)
            mx.async_eval(next_y, next_lp)
        yield y.item(), logprobs, False
        n += 1
        if n == max_tokens:
            break
        y, logprobs = next_y, next_lp


def _as_tokens(tokenizer, prompt) -> mx.array:
    if isinstance(prompt, str):
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return prompt if isinstance(prompt, mx.array) else mx.array(prompt)


class StopMatcher:
    """Holds back text that may be the start of a stop string, so none is ever emitted."""

    def __init__(self, stop_strings: Iterable[str]):
        self.stops = [s for s in stop_strings if s]
        self.text, self.emitted = "", 0

    def push(self, segment: str, final: bool = False):
        """-> (text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return segment, False
        self.text += segment
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        end = min(hits) if hits else len(self.text)
        if not hits and not final:
            end -= max(_overlap(self.text, s) for s in self.stops)
        out = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return out, bool(hits)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, Sequence[int]],
    max_tokens: int = 256,
    stop_strings: Iterable[str] = (),
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Stream text segments with mlx-lm's statistics. kwargs go to generate_step."""
    tokens = _as_tokens(tokenizer, prompt)
    if tokens.size == 0:
        raise ValueError("the prompt is empty: there is no token to continue from")
    detok = tokenizer.detokenizer
    detok.reset()
    stops = StopMatcher(stop_strings)
    tic = time.perf_counter()
    prompt_tps = 0.0
    finish = None
    for n, (token, logprobs, from_draft) in enumerate(
        generate_step(tokens, model, max_tokens=max_tokens, **kwargs), start=1
    ):
        if n == 1:
            prompt_tps = tokens.size / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            finish = "stop"
        else:
            detok.add_token(token)
        if finish is None and n == max_tokens:
            finish = "length"
        if finish is not None:
            detok.finalize()
        segment, hit = stops.push(detok.last_segment, final=finish is not None)
        if hit:
            finish = "stop"
        yield GenerationResponse(
            text=segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=tokens.size,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish is not None:
            break


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kw) -> str:
    text = ""
    last = None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kw):
        text += r.text
        last = r
        if verbose:
            print(r.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print_stats(last)
    return text


def print_stats(r: GenerationResponse, file=None) -> None:
    import sys

    file = file or sys.stderr
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)
