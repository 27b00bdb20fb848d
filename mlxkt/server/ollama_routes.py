"""Ollama-compatible routes: /api/chat, /api/generate, /api/tags, /api/show, /api/ps,
/api/version. Streaming is NDJSON (Ollama streams by default); durations are nanoseconds."""

import json
from datetime import datetime, timezone
from typing import List, Optional

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from .engine import Finish, SamplingParams
from .errors import APIError
from .prompt import Prompt
from .protocol import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaShowRequest, validate
from .service import (DisconnectAwareStream, ServerState, build_chat_prompt, build_raw_prompt, check_model,
                      collect, max_tokens_for, read_json, state_of, submit, token_prompt)

NDJSON = "application/x-ndjson"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("mlxkt")
    except Exception:  # running from a source tree that is not installed
        return "0.0.0"


def _params(state: ServerState, opts: Optional[OllamaOptions]) -> SamplingParams:
    o = opts or OllamaOptions()
    n = o.num_predict
    # -1 (no limit) and -2 (fill the context) both run to the end of the context
    max_tokens = state.engine.context_length if n is not None and n < 0 else max_tokens_for(state, n, "options.num_predict")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.8 if o.temperature is None else o.temperature,  # Ollama's defaults
        top_p=0.9 if o.top_p is None else o.top_p,
        top_k=40 if o.top_k is None else o.top_k,
        seed=o.seed,
        stop=list(o.stop or []),
        repetition_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
    )


def _final(state: ServerState, fin: Finish) -> dict:
    ns = 1_000_000_000
    return {
        "model": state.settings.model_name, "created_at": _now(), "done": True,
        "done_reason": fin.reason if fin.reason in ("stop", "length") else "stop",
        "total_duration": int((fin.queued_seconds + fin.prompt_seconds + fin.generation_seconds) * ns),
        "load_duration": 0,
        "prompt_eval_count": fin.prompt_tokens,
        "prompt_eval_duration": int(fin.prompt_seconds * ns),
        "eval_count": fin.completion_tokens,
        "eval_duration": int(fin.generation_seconds * ns),
    }


def _details(state: ServerState) -> dict:
    i = state.info
    return {"parent_model": "", "format": "mlx", "family": i.model_type, "families": [i.model_type],
            "parameter_size": i.parameter_size, "quantization_level": i.quantization}


def _tag(state: ServerState) -> dict:
    name = f"{state.settings.model_name}:latest"
    i = state.info
    return {"name": name, "model": name, "modified_at": _iso(i.modified_at), "size": i.size_bytes,
            "digest": i.digest, "details": _details(state)}


def _loaded(state: ServerState, kind: str) -> JSONResponse:
    """Answer to Ollama's "load the model" request (no prompt): it is always loaded."""
    out = {"model": state.settings.model_name, "created_at": _now(), "done": True, "done_reason": "load"}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return JSONResponse(out)


async def _respond(request: Request, state: ServerState, handle, stream: bool, kind: str, extra_final=None):
    """kind: "chat" (message objects) or "generate" (response strings)."""
    name = state.settings.model_name

    def piece(reasoning: str, content: str, **more) -> dict:
        out = {"model": name, "created_at": _now()}
        if kind == "chat":
            msg = {"role": "assistant", "content": content}
            if reasoning:
                msg["thinking"] = reasoning
            out["message"] = msg
        else:
            out["response"] = content
            if reasoning:
                out["thinking"] = reasoning
        return {**out, **more}

    def final(fin: Finish) -> dict:
        out = {**piece("", ""), **_final(state, fin)}
        if extra_final is not None:
            out.update(extra_final(fin))
        return out

    if stream:
        async def lines():
            try:
                async for ev in handle:
                    if not isinstance(ev, Finish):
                        yield json.dumps(piece(ev.reasoning, ev.content, done=False), ensure_ascii=False) + "\n"
                    elif ev.reason == "error":
                        yield json.dumps({"error": f"generation failed: {ev.error}"}) + "\n"
                    else:
                        yield json.dumps(final(ev), ensure_ascii=False) + "\n"
            finally:
                handle.cancel()

        return DisconnectAwareStream(lines(), media_type=NDJSON)

    got = await collect(request, handle)
    if got is None:
        return Response(status_code=499)
    reasoning, content, fin = got
    return JSONResponse({**final(fin), **piece(reasoning, content)})


def register(app: FastAPI) -> None:
    @app.get("/api/version")
    async def version():
        return {"version": _version()}

    @app.get("/api/tags")
    async def tags(request: Request):
        return {"models": [_tag(state_of(request))]}

    @app.get("/api/ps")
    async def ps(request: Request):
        state = state_of(request)
        return {"models": [{**_tag(state), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0}]}

    @app.post("/api/show")
    async def show(request: Request):
        state = state_of(request)
        req = validate(OllamaShowRequest, await read_json(request))
        check_model(state, req.model or req.name)
        i, tok = state.info, state.tokenizer
        template = getattr(tok, "chat_template", None) or "(built-in fallback, see mlxkt/server/prompt.py)"
        caps = ["completion"] + (["thinking"] if getattr(tok, "has_thinking", False) else [])
        return {
            "modelfile": f"# served by mlxkt\nFROM {state.settings.model_name}\n",
            "parameters": "", "template": template, "details": _details(state),
            "model_info": {"general.architecture": i.model_type, "general.parameter_count": i.parameters,
                           f"{i.model_type}.context_length": i.context_length,
                           f"{i.model_type}.vocab_size": i.vocab_size},
            "capabilities": caps, "modified_at": _iso(i.modified_at),
        }

    @app.post("/api/chat")
    async def chat(request: Request):
        state = state_of(request)
        req = validate(OllamaChatRequest, await read_json(request))
        check_model(state, req.model)
        params = _params(state, req.options)
        if not req.messages:
            return _loaded(state, "chat")
        prompt = await build_chat_prompt(state, [{"role": m.role, "content": m.content} for m in req.messages])
        handle = submit(state, prompt, params, split_thinking=True)
        return await _respond(request, state, handle, req.stream, "chat")

    @app.post("/api/generate")
    async def generate(request: Request):
        state = state_of(request)
        req = validate(OllamaGenerateRequest, await read_json(request))
        check_model(state, req.model)
        params = _params(state, req.options)
        if not req.prompt and not req.context:
            return _loaded(state, "generate")
        context: List[int] = list(req.context or [])
        if context:
            token_prompt(state, context)  # checks the ids
        if req.raw:
            new = await build_raw_prompt(state, req.prompt)
            tokens = new.tokens if not context else context + state.tokenizer.encode(req.prompt, add_special_tokens=False)
            prompt = Prompt(tokens, req.prompt, False)
        else:
            messages = ([{"role": "system", "content": req.system}] if req.system else [])
            messages.append({"role": "user", "content": req.prompt})
            new = await build_chat_prompt(state, messages)
            bos = state.tokenizer.bos_token_id
            tail = new.tokens[1:] if context and new.tokens and new.tokens[0] == bos else new.tokens
            prompt = Prompt(context + tail, new.text, new.in_thinking)
        if not prompt.tokens:
            raise APIError(400, "prompt is empty after tokenization", code="invalid_value")
        handle = submit(state, prompt, params, split_thinking=not req.raw)
        return await _respond(request, state, handle, req.stream, "generate",
                              extra_final=lambda fin: {"context": fin.tokens})
