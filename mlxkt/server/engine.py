"""One model, one generation thread, a bounded queue in front, an asyncio bridge behind.

MLX evaluation of one model is not safe from several threads at once, so every generation
runs on the engine's single worker thread, one request at a time. Requests wait in a
bounded queue (`QueueFull` when it is full). Each request gets a `Handle`: the worker pushes
`Piece`s and one final `Finish` into the handle's asyncio queue; the HTTP side iterates it
and calls `cancel()` when the client goes away, which the worker checks after every token.
"""

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from .prefix_cache import PrefixCache
from .textstream import StopMatcher, ThinkSplitter


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("generation queue is full")
        self.retry_after = retry_after


class ContextOverflow(Exception):
    def __init__(self, prompt_tokens: int, context_length: int):
        super().__init__(
            f"prompt has {prompt_tokens} tokens but the model's context is {context_length} "
            f"tokens (at least one must be left to generate)"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[Dict[int, float]] = None


@dataclass
class Job:
    prompt: List[int]
    params: SamplingParams
    split_thinking: bool = False  # separate <think>...</think> into reasoning
    in_thinking: bool = False  # the prompt already opened the thinking part


class Piece(NamedTuple):
    reasoning: str
    content: str


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous request
    prompt_seconds: float = 0.0  # queue exit to first token
    generation_seconds: float = 0.0
    queued_seconds: float = 0.0
    tokens: List[int] = field(default_factory=list)  # prompt + generated token ids
    error: Optional[str] = None


class Handle:
    """The HTTP side's view of one job."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, item) -> None:  # worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            self.cancelled.set()

    async def __aiter__(self):
        while True:
            item = await self.events.get()
            yield item
            if isinstance(item, Finish):
                return


class Engine:
    """`load_fn() -> (model, tokenizer)` runs on the worker thread: MLX streams belong to the
    thread that made them, so the model is built where it will be evaluated."""

    def __init__(
        self,
        load_fn: Callable[[], tuple],
        *,
        generate_fn: Callable,
        make_cache_fn: Callable,
        context_length: Optional[int] = None,
        sampling_fn: Optional[Callable[[SamplingParams], dict]] = None,
        max_queue: int = 32,
        prefix_cache: bool = True,
    ):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.model = None
        self.tokenizer = None
        self.context_length = context_length  # set by the caller once the model is known
        self.max_queue = max_queue
        self._load = load_fn
        self._generate = generate_fn
        self._sampling = sampling_fn or sampling_kwargs
        self._prefix = PrefixCache(lambda: make_cache_fn(self.model), enabled=prefix_cache)
        self._jobs: "queue.Queue[Optional[Handle]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: Optional[Handle] = None
        self._served = 0
        self._avg_seconds = 1.0  # running mean of a job's duration, for Retry-After
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # --- HTTP side -------------------------------------------------------------------
    def check_prompt(self, n_tokens: int) -> None:
        if n_tokens >= self.context_length:
            raise ContextOverflow(n_tokens, self.context_length)
        if n_tokens == 0:
            raise ValueError("the prompt is empty")

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Handle:
        self.check_prompt(len(job.prompt))
        handle = Handle(job, loop)
        with self._lock:
            if self._thread is None or self._stopping:
                raise RuntimeError("engine is not running")
            if self._waiting >= self.max_queue:
                raise QueueFull(max(1, min(60, math.ceil(self._avg_seconds * self._waiting))))
            self._waiting += 1
        self._jobs.put(handle)
        return handle

    def stats(self) -> dict:
        with self._lock:
            running = int(self._running is not None)
            return {"running": running, "waiting": self._waiting,
                    "active": running + self._waiting, "served": self._served}

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Starts the worker and waits until it has loaded the model (load errors re-raised)."""
        if self._thread is not None:
            return
        self._stopping = False
        ready: "queue.Queue[Optional[BaseException]]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name="mlxkt-generate", daemon=True)
        self._thread.start()
        err = ready.get()
        if err is not None:
            self._thread.join()
            self._thread = None
            raise err

    def cancel_all(self) -> None:
        """Cancels the running job and every waiting one (server shutdown)."""
        with self._lock:
            if self._running is not None:
                self._running.cancel()
        while True:
            try:
                h = self._jobs.get_nowait()
            except queue.Empty:
                return
            if h is None:  # a stop request: leave it for the worker
                self._jobs.put(None)
                return
            with self._lock:
                self._waiting -= 1
            h.push(Finish("cancelled", prompt_tokens=len(h.job.prompt)))

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True  # the worker now cancels whatever it dequeues
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None

    # --- worker thread ----------------------------------------------------------------
    def _loop(self, ready: "queue.Queue") -> None:
        import mlx.core as mx

        try:
            try:
                self.model, self.tokenizer = self._load()
                self._prefix.step_back = int(isinstance(self.model, dict) and "mtp" in self.model)
            except BaseException as e:
                ready.put(e)
                return
            ready.put(None)
            self._serve()
        finally:
            # MLX streams are per thread; a thread must destroy its own before it ends, or
            # the process may abort at exit ("terminate called without an active exception").
            self._prefix.reset()
            mx.clear_streams()

    def _serve(self) -> None:
        while True:
            handle = self._jobs.get()
            if handle is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running = handle
            start = time.perf_counter()
            try:
                if handle.cancelled.is_set() or self._stopping:
                    handle.push(Finish("cancelled", prompt_tokens=len(handle.job.prompt)))
                else:
                    handle.push(self._run(handle))
            except Exception as e:  # a failed generation must not take the server down
                self._prefix.reset()
                handle.push(Finish("error", prompt_tokens=len(handle.job.prompt), error=f"{type(e).__name__}: {e}"))
            finally:
                with self._lock:
                    self._running = None
                    self._served += 1
                    self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.perf_counter() - start)

    def _run(self, handle: Handle) -> Finish:
        job, p = handle.job, handle.job.params
        t0 = time.perf_counter()
        kwargs = self._sampling(p)
        # Logits processors see only the tokens passed in: give them the whole prompt.
        cache, reused = self._prefix.take(job.prompt, reuse="logits_processors" not in kwargs)
        max_tokens = max(1, min(p.max_tokens, self.context_length - len(job.prompt)))
        stopper = StopMatcher(p.stop)
        splitter = ThinkSplitter(job.in_thinking) if job.split_thinking else None

        def emit(text: str) -> None:
            if not text:
                return
            piece = Piece(*splitter.feed(text)) if splitter else Piece("", text)
            if piece.reasoning or piece.content:
                handle.push(piece)

        generated: List[int] = []  # every token fed back to the model (EOS included)
        completion, reason, t_first = 0, None, None
        stream = self._generate(self.model, self.tokenizer, job.prompt[reused:], max_tokens=max_tokens,
                                prompt_cache=cache, **kwargs)
        try:
            for r in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                generated.append(r.token)
                if r.finish_reason != "stop":  # the final "stop" response carries EOS
                    completion += 1
                text, hit = stopper.feed(r.text)
                emit(text)
                if hit:
                    reason = "stop"
                    break
                if handle.cancelled.is_set():
                    reason = "cancelled"
                    break
                if r.finish_reason is not None:
                    reason = r.finish_reason
                    break
        finally:
            stream.close()
        emit(stopper.flush())
        if splitter is not None:
            tail = Piece(*splitter.flush())
            if tail.reasoning or tail.content:
                handle.push(tail)
        t_end = time.perf_counter()
        tokens = list(job.prompt) + generated
        self._prefix.store(cache, tokens)
        t_first = t_first or t_end
        return Finish(
            reason or "length", prompt_tokens=len(job.prompt), completion_tokens=completion,
            cached_tokens=reused, prompt_seconds=t_first - t0, generation_seconds=t_end - t_first,
            queued_seconds=t0 - handle.submitted, tokens=tokens,
        )


def sampling_kwargs(p: SamplingParams) -> dict:
    """mlxkt.stream_generate keyword arguments for these settings.

    `sampling=` (not a bare sampler) keeps MTP speculative decoding on: it needs the exact
    distribution the sampler draws from. Logits processors (penalties, logit_bias) make
    mlxkt fall back to plain decoding with the same sampler.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors

    from ..sampling import Sampling

    if p.seed is not None:
        mx.random.seed(p.seed % (1 << 64))
    kwargs = {"sampling": Sampling(temp=p.temperature, top_p=p.top_p, top_k=p.top_k)}
    if p.presence_penalty or p.frequency_penalty or p.repetition_penalty or p.logit_bias:
        kwargs["logits_processors"] = make_logits_processors(
            logit_bias=p.logit_bias or None,
            repetition_penalty=p.repetition_penalty or None,
            presence_penalty=p.presence_penalty or None,
            frequency_penalty=p.frequency_penalty or None,
        )
    return kwargs
