"""Keeps the KV cache of the last request so that the next one can reuse its shared prefix.

A chat's next turn re-sends the whole conversation: its prompt starts with the previous
prompt and (mostly) the previous answer. The cache is trimmed back to the longest common
prefix of the two token lists and only the rest of the new prompt is run through the model.
One cache is kept (one model, one conversation at a time); it belongs to the worker thread.
"""

from typing import Callable, List, Optional, Tuple


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cache_length(cache) -> Optional[int]:
    # mlx-lm KVCache (and mlxkt's MLA caches, which are KVCache objects) count tokens in
    # `offset`; a cache type without it is not reused.
    lengths = {getattr(c, "offset", None) for c in cache}
    if len(lengths) != 1 or None in lengths:
        return None
    return lengths.pop()


class PrefixCache:
    def __init__(self, make_cache: Callable[[], list], enabled: bool = True, step_back: int = 0):
        self.make_cache = make_cache
        self.enabled = enabled
        # MTP models: the MTP cache entry at position i pairs h_i with token i+1, so the
        # entry before the first differing token is stale too (a worse draft, not wrong output).
        self.step_back = step_back
        self.cache: Optional[list] = None
        self.tokens: List[int] = []  # the tokens whose keys/values `cache` holds

    def reset(self) -> None:
        self.cache, self.tokens = None, []

    def take(self, prompt: List[int], reuse: bool = True) -> Tuple[list, int]:
        """Returns (cache, n): a cache holding the first n tokens of `prompt` (n < len)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, tokens = self.cache, self.tokens
        self.reset()  # the cache is in use until store() hands it back
        if reuse and self.enabled and cache is not None and can_trim_prompt_cache(cache):
            # Keep at least one prompt token to run: its logits give the first new token.
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n < len(tokens):  # a prompt that only extends the cache keeps every entry
                n -= self.step_back
            if n > 0:
                trim_prompt_cache(cache, len(tokens) - n)
                return cache, n
        return self.make_cache(), 0

    def store(self, cache: list, tokens: List[int]) -> None:
        """`tokens`: every token fed to the model with this cache, in order."""
        if not self.enabled:
            return
        length = _cache_length(cache)
        if length is None or length > len(tokens):
            return  # unknown content: safer to start afresh next time
        self.cache, self.tokens = cache, tokens[:length]
