"""Decode attention over a key count rounded up to a multiple of 8 (CUDA, long caches).

cuBLASLt takes its slow alignment-1 kernels when a matmul's output rows are not a multiple
of 8 elements, and the decode attention's score matrices are [heads, keys]: 7 steps in 8 ran
them. On an H200 the plain MLA attention of one layer at 32769 keys took 167 µs, 104-116 µs
over 32776 keys with the last 7 masked, 77-89 µs at 32768 (benchmarks/mla_align.py); at 1K-4K
keys padding did not pay. The extra keys are rows of the cache buffer past the valid ones
(zeros or stale entries): their rope scores are set to -inf, so they get zero weight.
"""

from mlx_lm.models.cache import KVCache

from ..device import env_switch
from ..kernels.dispatch import gpu_backend

ENV = "MLXKT_PAD_KEYS"  # 1/0: always / never; unset: CUDA from MIN_KEYS keys on
MIN_KEYS = 8192


def padded_keys(cache, latent, k_pe, mask=None, forced=None):
    """(latent, k_pe, valid): the cache buffer's first S' rows (S' = S rounded up to a
    multiple of 8) and S, when padding applies; else the views as given and None."""
    # latent / k_pe: [B, 1, S, *] views of cache.keys / cache.values
    S = latent.shape[2]
    if mask is not None or S % 8 == 0 or type(cache) is not KVCache:
        return latent, k_pe, None
    on = env_switch(ENV) if forced is None else forced
    if on is None:
        on = S >= MIN_KEYS and gpu_backend() == "cuda"
    padded = S + (-S) % 8
    if not on or cache.keys.shape[2] < padded:
        return latent, k_pe, None
    return cache.keys[:, :, :padded], cache.values[:, :, :padded], S
