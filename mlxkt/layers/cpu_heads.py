"""Attention heads shared among CPU streams.

MLX runs each CPU stream on its own thread, while one float matmul of MLX's Linux wheel runs
on one core (it links the reference BLAS). Attention over a long cache is most of a CPU
decode step (two thirds at 8K on the fixture), so half of the heads on a second stream nearly
halves it on a 2-core machine. Only for the CPU device and caches of MIN_KEYS or more;
MLXKT_CPU_STREAMS=1 turns it off (default: 2 where there are 2 cores or more).
"""

import os
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx

ENV = "MLXKT_CPU_STREAMS"
MIN_KEYS = 1024  # shorter caches: the extra nodes cost about what the second core saves


def cpu_streams() -> int:
    value = os.environ.get(ENV, "").strip()
    if value:
        return max(1, int(value))
    return 2 if (os.cpu_count() or 1) >= 2 else 1


@lru_cache(maxsize=None)
def side_streams(n: int) -> tuple:
    """n - 1 extra CPU streams, made once per process (each has a thread)."""
    return tuple(mx.new_stream(mx.cpu) for _ in range(n - 1))


def split_heads(attend: Callable, q, q_pe, k, v, k_pe, mask=None) -> Optional[mx.array]:
    """attend(q, q_pe, k, v, k_pe, mask) with the heads spread over CPU streams; None when
    it does not apply (a GPU, a short cache, one stream or one head)."""
    # q, q_pe: [B, H, L, *]; k, v, k_pe: [B, 1 | H, S, *] -> [B, H, L, dv]
    H, S = q.shape[1], k.shape[2]
    if S < MIN_KEYS or mx.default_device().type != mx.cpu:  # cheap checks first: every call
        return None
    n = min(cpu_streams(), H)
    if n < 2:
        return None
    streams = (mx.default_stream(mx.cpu),) + side_streams(n)
    bounds = [H * i // n for i in range(n + 1)]
    outs = []
    for s, a, b in zip(streams, bounds[:-1], bounds[1:]):
        def heads(t):  # the shared latent (one "head") stays whole
            return t if t.shape[1] == 1 else t[:, a:b]

        with mx.stream(s):
            outs.append(attend(q[:, a:b], q_pe[:, a:b], heads(k), heads(v), heads(k_pe), mask))
    return mx.concatenate(outs, axis=1)
