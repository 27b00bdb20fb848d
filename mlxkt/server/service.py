"""Glue shared by the OpenAI and Ollama routes: body parsing, prompt building, submission,
collection of a whole answer, and a streaming response that notices disconnects."""

import asyncio
from dataclasses import dataclass
from typing import List, Optional, Tuple

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .engine import ContextOverflow, Engine, Finish, Handle, Job, QueueFull, SamplingParams
from .errors import APIError
from .modelinfo import ModelInfo
from .prompt import Prompt, TemplateError, chat_prompt, raw_prompt
from .protocol import parse_json
from .settings import ServerSettings


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object
    settings: ServerSettings
    info: ModelInfo

    def accepts_model(self, name: str) -> bool:
        # Ollama clients add a tag; ":latest" is what they add by default.
        own = self.settings.model_name
        return name == own or name == f"{own}:latest"


def state_of(request: Request) -> ServerState:
    return request.app.state.mlxkt


async def read_json(request: Request) -> dict:
    return parse_json(await request.body())


def check_model(state: ServerState, name: str) -> None:
    if not state.accepts_model(name):
        raise APIError(404, f"model {name!r} not found: this server serves {state.settings.model_name!r}",
                       param="model", code="model_not_found")


def max_tokens_for(state: ServerState, requested: Optional[int], param: str = "max_tokens") -> int:
    ctx = state.engine.context_length
    if requested is None:
        return min(state.settings.default_max_tokens, ctx)
    if requested > ctx:
        raise APIError(400, f"{param} is {requested} but the model's context is {ctx} tokens",
                       param=param, code="invalid_value")
    return requested


async def build_chat_prompt(state: ServerState, messages: List[dict]) -> Prompt:
    try:
        return await asyncio.to_thread(chat_prompt, state.tokenizer, messages)
    except TemplateError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value")


async def build_raw_prompt(state: ServerState, text: str) -> Prompt:
    return await asyncio.to_thread(raw_prompt, state.tokenizer, text)


def token_prompt(state: ServerState, tokens: List[int]) -> Prompt:
    vocab = state.info.vocab_size
    bad = [t for t in tokens if t >= vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})",
                       param="prompt", code="invalid_value")
    return Prompt(list(tokens), "", False)


def submit(state: ServerState, prompt: Prompt, params: SamplingParams, *, split_thinking: bool) -> Handle:
    """Queues a generation; every refusal happens here, before any byte is streamed."""
    if params.logit_bias:
        vocab = state.info.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise APIError(400, f"logit_bias names a token id outside the vocabulary (size {vocab})",
                           param="logit_bias", code="invalid_value")
    job = Job(prompt.tokens, params, split_thinking=split_thinking, in_thinking=prompt.in_thinking)
    try:
        return state.engine.submit(job, asyncio.get_running_loop())
    except ContextOverflow as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded")
    except ValueError as e:
        raise APIError(400, str(e), param="prompt", code="invalid_value")
    except QueueFull as e:
        raise APIError(503, "server busy: the generation queue is full, retry later",
                       code="queue_full", headers={"Retry-After": str(e.retry_after)})


async def collect(request: Request, handle: Handle) -> Optional[Tuple[str, str, Finish]]:
    """Whole answer as (reasoning, content, finish); None if the client went away."""
    reasoning, content = [], []
    result: List[Finish] = []

    async def consume(scope):
        async for ev in handle:
            if isinstance(ev, Finish):
                result.append(ev)
            else:
                reasoning.append(ev.reasoning)
                content.append(ev.content)
        scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, tg.cancel_scope)
            await _wait_disconnect(request.receive)
            tg.cancel_scope.cancel()
    finally:
        handle.cancel()  # no-op once finished; stops the worker if the client left
    if not result:
        return None
    finish = result[0]
    if finish.reason == "error":
        raise APIError(500, f"generation failed: {finish.error}", code="generation_error")
    return "".join(reasoning), "".join(content), finish


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectAwareStream(StreamingResponse):
    """Streams while listening for the client leaving, and then closes the body iterator
    at once (its `finally` cancels the generation), whatever the ASGI spec version."""

    async def __call__(self, scope, receive, send):
        async def stream(cancel_scope):
            try:
                await self.stream_response(send)
            except OSError:  # the client left while we were sending
                pass
            finally:
                cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream, tg.cancel_scope)
                await _wait_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
