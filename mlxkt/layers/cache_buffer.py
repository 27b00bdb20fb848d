"""Decode attention over a layer's whole cache buffer, so the step can be compiled.

A KVCache keeps its entries in a buffer that grows 256 rows at a time, and its
update_and_fetch writes the new entries (two SliceUpdates) and returns views of the valid
rows: their shapes change every step, so that part of a decode step stayed eager, about
a dozen graph nodes per layer that the host built in Python each step (27 µs a layer on
this project's CPU machine against 5 µs for the same ops replayed by mx.compile).

Here the step writes the new entries into the buffer in place at the known offset (two
eager SliceUpdates) and a compiled piece attends over the buffer's rows, with the rows
past the position masked by an additive bias that the step makes once for all its layers.
Shapes change only when the buffer grows, so each layer's piece is traced once per buffer
size. (write_and_attend, the write inside the compiled piece at a position held in an
array, copies the buffer, since a compiled function's inputs are not donated: on an H200
13 µs a write at 1K keys against 2 µs in place.) The buffer's row count is a multiple of
256, which also keeps cuBLAS on its aligned kernels (layers/key_padding.py).
"""

from functools import lru_cache
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..device import env_switch
from ..kernels.dispatch import gpu_backend

ENV = "MLXKT_BUFFER_ATTENTION"  # 1/0: always / never where it applies; unset: on CUDA


def enabled(forced: Optional[bool] = None) -> bool:
    on = env_switch(ENV) if forced is None else forced
    return gpu_backend() == "cuda" if on is None else on


def applies(cache, mask, L: int) -> bool:
    """One new token (no mask to honour) into a plain KVCache."""
    return L == 1 and mask is None and type(cache) is KVCache


def reserve(cache: KVCache, like_keys: mx.array, like_values: mx.array) -> None:
    """Make room in cache's buffers for the L entries shaped like like_keys / like_values
    ([B, 1, L, *]): grown with zeros to a multiple of cache.step rows (KVCache grows in
    steps too, but from an unaligned offset after a trim), its entries kept; nothing is
    written."""
    B, n, L, _ = like_keys.shape
    need = cache.offset + L
    if cache.keys is not None and need <= cache.keys.shape[2]:
        return
    rows = -(-need // cache.step) * cache.step
    grown = []
    for old, like in ((cache.keys, like_keys), (cache.values, like_values)):
        pad = mx.zeros((B, n, rows - cache.offset, like.shape[-1]), like.dtype)
        grown.append(pad if old is None else mx.concatenate([old[..., :cache.offset, :], pad], 2))
    cache.keys, cache.values = grown


@lru_cache(maxsize=8)
def key_bias(rows: int, heads: int, dtype):
    """A function of the step's position pos (shape (1,)) that gives the additive bias of a
    one-token step over `rows` buffer rows: [1, 1, heads, rows], 0 up to pos, -inf after.
    One fused kernel per step, shared by the layers; materialised at the score rows' shape,
    since mx.addmm copies a bias it has to broadcast (one more kernel per layer)."""
    index = mx.broadcast_to(mx.arange(rows, dtype=mx.int32), (1, 1, heads, rows))
    mx.eval(index)  # a constant of the compiled function, not a node of every step
    zero, neg = mx.array(0, dtype), mx.array(-float("inf"), dtype)
    return mx.compile(lambda pos: mx.where(index <= pos, zero, neg))


def write_and_attend(q, q_pe, latent, k_pe, keys, values, pos, bias, scale: float):
    """Write the new entries at pos and attend over the whole buffer (attend_buffer).
    Returns (out, keys, values): the attention and the updated buffers."""
    # latent / k_pe: [B, 1, 1, *], pos: (1,)
    keys = mx.slice_update(keys, latent, pos, (2,))
    values = mx.slice_update(values, k_pe, pos, (2,))
    return attend_buffer(q, q_pe, keys, values, bias, scale), keys, values


def attend_buffer(q, q_pe, keys, values, bias, scale: float):
    """softmax(scale q k^T + q_pe k_pe^T + bias) v over the buffer's rows, k = v = the
    latent rows, k_pe = values. The heads are rows of one matrix (the layout that
    MLAttention.absorbed_queries(rows=True) gives and absorbed_output(rows=True) takes)."""
    # q: [B, 1, H, r], q_pe: [B, 1, H, rope] (pre-scaled), keys / values: [B, 1, SB, r] /
    # [B, 1, SB, rope], bias: [1, 1, H, SB] -> [B, 1, H, r]
    pe = mx.addmm(bias, q_pe, values.swapaxes(-1, -2))  # [B, 1, H, SB]
    scores = mx.addmm(pe, q, keys.swapaxes(-1, -2), alpha=scale)
    return mx.softmax(scores, axis=-1, precise=True) @ keys
