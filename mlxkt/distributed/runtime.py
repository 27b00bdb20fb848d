"""Rank 0 drives, the other ranks follow.

Rank 0 runs the ordinary generate / chat / serve code on a DistributedModel. Each forward call
first broadcasts a small message (cache id, cache length, tokens), then runs its part of the
model; the followers run a loop that receives the message and runs the same forward on their
part with their own caches. So every collective happens in the same order on every rank, and
any generation code (prefix reuse, cache trimming, sampling) works unchanged on rank 0.

Message (int32 [HEAD + INLINE]): op, cache id, cache length, B, L, up to FREED ids of caches
rank 0 has dropped, then the first INLINE tokens; longer inputs follow in a second all_sum.

Decode steps are pipelined, as in single-process generation: rank 0 queues step n+1 before
it waits for step n (it runs on the broadcast copy of its tokens, which orders the message
before the step's collectives), and a follower builds its next decode step while the GPU
still runs the current one, then checks the message and throws that guess away if rank 0
asked for something else (see Ahead).
"""

import atexit
import itertools
import threading
import weakref
from collections import OrderedDict
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import trim_prompt_cache

FORWARD, STOP = 1, 2
HEAD, FREED, INLINE = 8, 3, 56
MAX_FOLLOWER_CACHES = 8  # caches a follower keeps when rank 0 never says it dropped them


def head_logits(model: nn.Module, h: mx.array) -> mx.array:
    # h: [B, L, D] -> logits [B, L, vocab]
    if getattr(model.args, "tie_word_embeddings", False) and "lm_head" not in model:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


class CacheIds:
    """Rank 0: a stable id per cache list (keyed by its first entry), and ids of dropped ones."""

    def __init__(self):
        self.ids = weakref.WeakKeyDictionary()
        self.counter = itertools.count(1)
        self.freed: List[int] = []
        self.lock = threading.Lock()

    def describe(self, cache) -> tuple:
        if not cache:
            return 0, 0
        first = cache[0]
        cid = self.ids.get(first)
        if cid is None:
            cid = self.ids[first] = next(self.counter)
            weakref.finalize(first, self._drop, cid)
        return cid, first.offset

    def _drop(self, cid: int) -> None:
        with self.lock:
            self.freed.append(cid)

    def take_freed(self) -> List[int]:
        with self.lock:
            out, self.freed = self.freed[:FREED], self.freed[FREED:]
        return out


class DistributedModel(nn.Module):
    """Rank 0's model: same calls as the wrapped one (model(tokens, cache), make_cache, args)."""

    def __init__(self, model: nn.Module, comm, mode: str):
        super().__init__()
        self.inner = model
        self.comm, self.mode = comm, mode
        self.cache_ids = CacheIds()
        self.stopped = False
        self.pending = None  # the last queued decode step's hidden state
        atexit.register(self.shutdown)

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            inner = self.get("inner")
            if inner is None:
                raise
            return getattr(inner, key)

    @property
    def layers(self):
        return self.inner.layers

    def make_cache(self):
        return self.inner.make_cache()

    def __call__(self, inputs: mx.array, cache: Optional[list] = None) -> mx.array:
        # inputs: [B, L] -> logits [B, L, vocab]
        if self.stopped:
            raise RuntimeError("the distributed group was shut down")
        if self.comm.size == 1:
            return head_logits(self.inner, self.inner.model(inputs, cache))
        cid, offset = self.cache_ids.describe(cache)
        B, L = inputs.shape
        with self.comm.step("a forward step"):
            tokens = self._announce(FORWARD, cid, offset, inputs)
            h = self.inner.model(tokens.reshape(B, L), cache)
            if B * L <= INLINE and L == 1:  # decode: queue this step, then wait for the last one
                mx.async_eval(h)
                pending, self.pending = self.pending, h
                if pending is not None:
                    mx.eval(pending)  # generation reads its token next anyway; here a failure is caught
            else:
                self.pending = None
                mx.eval(h)  # every collective of this step happens inside the guarded section
        return head_logits(self.inner, h)

    def _announce(self, op: int, cid: int, offset: int, inputs: Optional[mx.array]) -> mx.array:
        """Broadcasts the message; returns the tokens as every rank receives them (lazy when
        they fit the message: the step that uses them runs the all_sum first)."""
        B, L = inputs.shape if inputs is not None else (0, 0)
        freed = self.cache_ids.take_freed()
        head = [op, cid, offset, B, L] + freed + [0] * (FREED - len(freed))
        flat = inputs.reshape(-1).astype(mx.int32) if inputs is not None else mx.zeros((0,), mx.int32)
        first = mx.concatenate([mx.array(head, mx.int32), flat[:INLINE],
                                mx.zeros((INLINE - min(INLINE, flat.size),), mx.int32)])
        msg = self.comm.all_sum(first)
        if flat.size <= INLINE:
            return msg[HEAD : HEAD + flat.size]
        mx.eval(msg)  # the followers wait for it before they queue the rest
        rest = self.comm.all_sum(flat[INLINE:])
        mx.eval(rest)
        return mx.concatenate([msg[HEAD:], rest])

    def shutdown(self) -> None:
        """Tell the followers to exit (also run at exit). Safe to call twice."""
        if self.stopped or self.comm.size == 1:
            self.stopped = True
            return
        self.stopped = True
        with self.comm.step("telling the other ranks to stop", seconds=min(self.comm.timeout, 30)):
            mx.eval(self._announce(STOP, 0, 0, None))


class FollowerCaches:
    """A follower's caches, by rank 0's ids; trimmed to the length rank 0 says they have."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.caches: "OrderedDict[int, list]" = OrderedDict()

    def get(self, cid: int, offset: int) -> Optional[list]:
        if cid == 0:
            return None
        cache = self.caches.get(cid)
        if cache is None:
            if offset != 0:
                raise RuntimeError(f"rank 0 continues cache {cid} at length {offset}, which this "
                                   f"rank does not hold (it keeps {MAX_FOLLOWER_CACHES} caches)")
            cache = self.caches[cid] = self.model.make_cache()
            while len(self.caches) > MAX_FOLLOWER_CACHES:
                self.caches.popitem(last=False)
        self.caches.move_to_end(cid)
        have = cache[0].offset
        if have < offset:
            raise RuntimeError(f"cache {cid} holds {have} tokens here but {offset} on rank 0")
        if have > offset:
            trim_prompt_cache(cache, have - offset)
        return cache

    def touch(self, cid: int) -> list:
        self.caches.move_to_end(cid)
        return self.caches[cid]

    def drop(self, ids) -> None:
        for cid in ids:
            self.caches.pop(cid, None)


class Ahead:
    """A follower's next decode step, built before rank 0's message says what it is: the
    host builds it while the GPU runs the current step. undo() puts the caches back (the
    guess was never queued, so nothing of it runs)."""

    def __init__(self, model: nn.Module, cache: list, key: tuple, tokens: mx.array):
        # A new handle per cache array: the forward overwrites the cache's own in place.
        self.saved = [{k: mx.stop_gradient(v) if isinstance(v, mx.array) else v
                       for k, v in vars(c).items()} for c in cache]
        self.cache, self.key = cache, key
        self.h = model.model(tokens, cache)

    def take(self) -> mx.array:
        self.saved = None  # let the step update the cache buffers in place
        return self.h

    def undo(self) -> None:
        for c, saved in zip(self.cache, self.saved):
            vars(c).update(saved)


def syncs_in_decode(model: nn.Module) -> bool:
    """Whether a decode step reads values back on the host (then it cannot be built ahead:
    the read would run its collectives before rank 0 asked for them)."""
    from .shard import LocalExperts

    return any(isinstance(m, LocalExperts) and m.syncs(1) for _, m in model.named_modules())


def follow(model: nn.Module, comm, batch: bool = False) -> dict:
    """The loop of ranks > 0: mirror rank 0's forward calls until it says stop.
    batch: rank 0 is never idle for long (a benchmark or one-shot run), so the wait for its
    next step is bounded by the step timeout; otherwise it may last forever (a server with no
    requests). Usually MLX raises when rank 0's sockets close, but now and then (2 of 4 CI
    runs in one session) a follower was left waiting.
    -> how many decode steps were built ahead and used, and how many were thrown away."""
    stats = {"built_ahead": 0, "ahead_undone": 0}
    caches = FollowerCaches(model)
    blank = mx.zeros((HEAD + INLINE,), mx.int32)
    build_ahead = not syncs_in_decode(model)
    ahead: Optional[Ahead] = None
    msg = comm.all_sum(blank)
    while True:
        if not batch:
            try:  # idle: waiting for rank 0's next step can take forever (a server with no requests)
                head = msg[:HEAD].tolist()
            except RuntimeError as e:
                comm.fail("waiting for rank 0", e)
        else:
            with comm.step("waiting for rank 0's next step"):
                head = msg[:HEAD].tolist()
        op, cid, offset, B, L = head[:5]
        if ahead is not None and (ahead.key != (cid, offset, B, L) or op != FORWARD):
            ahead.undo()
            ahead = None
            stats["ahead_undone"] += 1
        caches.drop([c for c in head[5:HEAD] if c])
        if op == STOP:
            return stats
        with comm.step("a forward step"):
            if ahead is not None:
                stats["built_ahead"] += 1
                h, cache = ahead.take(), caches.touch(cid)
                ahead = None
            else:
                tokens = msg[HEAD : HEAD + min(INLINE, B * L)]
                if B * L > INLINE:
                    tokens = mx.concatenate([tokens, comm.all_sum(mx.zeros((B * L - INLINE,), mx.int32))])
                    mx.eval(tokens)  # now: rank 0 waits for it before it goes on
                try:
                    cache = caches.get(cid, offset)
                except RuntimeError as e:
                    comm.fail("keeping the caches in step with rank 0", e)
                h = model.model(tokens.reshape(B, L), cache)
            if L == 1 and B * L <= INLINE:
                msg = comm.all_sum(blank)  # queued after this step's collectives, as on rank 0
                mx.async_eval(h)
                mx.async_eval(msg)
                if build_ahead and cid != 0:
                    ahead = Ahead(model, cache, (cid, offset + 1, B, 1), msg[HEAD : HEAD + B].reshape(B, 1))
            else:
                mx.eval(h)
                msg = comm.all_sum(blank)
