"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

import json
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from .engine import Finish, SamplingParams
from .errors import APIError
from .protocol import ChatCompletionRequest, CompletionRequest, validate
from .service import (DisconnectAwareStream, ServerState, build_chat_prompt, build_raw_prompt, check_model,
                      collect, max_tokens_for, read_json, state_of, submit, token_prompt)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish_reason(f: Finish) -> str:
    return f.reason if f.reason in ("stop", "length") else "stop"


def _usage(f: Finish) -> dict:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    }


def _sse_response(handle, first, piece, finish) -> DisconnectAwareStream:
    """SSE over one generation: the `first` events, `piece(ev)` per text piece, the events of
    `finish(ev)`, then [DONE]; an engine error becomes an error event. Leaving cancels it."""
    async def events():
        try:
            for e in first:
                yield e
            async for ev in handle:
                if not isinstance(ev, Finish):
                    yield piece(ev)
                elif ev.reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {ev.error}",
                                          "type": "server_error", "param": None, "code": "generation_error"}})
                else:
                    for e in finish(ev):
                        yield e
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()

    return DisconnectAwareStream(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _model_card(state: ServerState) -> dict:
    return {"id": state.settings.model_name, "object": "model", "created": int(state.info.modified_at),
            "owned_by": "mlxkt", "context_length": state.info.context_length}


def _params(state: ServerState, req, max_tokens: Optional[int], param: str) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_tokens=max_tokens_for(state, max_tokens, param),
        temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's defaults
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=stop,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
    )


def register(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list", "data": [_model_card(state_of(request))]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        state = state_of(request)
        check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state = state_of(request)
        req = validate(ChatCompletionRequest, await read_json(request))
        check_model(state, req.model)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = _params(state, req, req.max_completion_tokens or req.max_tokens, param)
        prompt = await build_chat_prompt(state, [{"role": m.role, "content": m.text()} for m in req.messages])
        handle = submit(state, prompt, params, split_thinking=True)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        name = state.settings.model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        if req.stream:
            def chunk(delta, finish=None):
                c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if include_usage:
                    c["usage"] = None
                return _sse(c)

            def piece(ev):
                delta = {}
                if ev.reasoning:
                    delta["reasoning_content"] = ev.reasoning
                if ev.content:
                    delta["content"] = ev.content
                return chunk(delta)

            def finish(ev):
                yield chunk({}, _finish_reason(ev))
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": name, "choices": [], "usage": _usage(ev)})

            return _sse_response(handle, [chunk({"role": "assistant", "content": ""})], piece, finish)

        got = await collect(request, handle)
        if got is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        reasoning, content, fin = got
        message = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(fin)}],
            "usage": _usage(fin),
        })

    @app.post("/v1/completions")
    async def completions(request: Request):
        state = state_of(request)
        req = validate(CompletionRequest, await read_json(request))
        check_model(state, req.model)
        params = _params(state, req, req.max_tokens, "max_tokens")
        if isinstance(req.prompt, str):
            if not req.prompt:
                raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
            prompt = await build_raw_prompt(state, req.prompt)
        else:
            prompt = token_prompt(state, req.prompt)
        handle = submit(state, prompt, params, split_thinking=False)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        name = state.settings.model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def body(text, finish=None):
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            def finish(ev):
                yield _sse(body("", _finish_reason(ev)))
                if include_usage:
                    yield _sse({**body(""), "choices": [], "usage": _usage(ev)})

            return _sse_response(handle, [], lambda ev: _sse(body(ev.content)), finish)

        got = await collect(request, handle)
        if got is None:
            return Response(status_code=499)
        _, content, fin = got
        return JSONResponse({**body(content, _finish_reason(fin)), "usage": _usage(fin)})
