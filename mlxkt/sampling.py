"""Sampling settings that give both a sampler and the exact distribution it draws from
(speculative decoding needs the latter to accept or reject drafted tokens)."""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler


@dataclass(frozen=True)
class Sampling:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def sampler(self):
        return make_sampler(temp=self.temp, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p)

    def target_logprobs(self, logprobs: mx.array) -> mx.array:
        """log p of the distribution `sampler()` samples from (same filters, same order)."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, 1)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        logits = logprobs / self.temp
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
