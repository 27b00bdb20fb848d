"""The ASGI app: routes, guards, error handlers, the chat page; and model loading."""

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from . import ollama_routes, openai_routes
from .engine import Engine
from .errors import APIError, error_body
from .modelinfo import context_length_of, describe, read_config
from .security import AuthGuard, HostOriginGuard
from .service import ServerState
from .settings import ServerSettings

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    # Everything the page needs comes from this server: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PAGE_FILES = {"/": ("index.html", "text/html"), "/static/chat.js": ("chat.js", "text/javascript"),
              "/static/chat.css": ("chat.css", "text/css")}


def _error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, err), status_code=err.status, headers=err.headers)


def create_app(state: ServerState) -> FastAPI:
    engine = state.engine

    @asynccontextmanager
    async def lifespan(app):
        # The engine (and its model) outlives the app; the owner stops it.
        engine.start()
        try:
            yield
        finally:
            engine.cancel_all()  # whatever uvicorn's graceful shutdown left behind

    # No /docs or /openapi.json: less surface, and the page is at /.
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mlxkt = state

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return _error(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed"}.get(
            exc.status_code, str(exc.detail))
        return _error(request, APIError(exc.status_code, msg, headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return _error(request, APIError(400, str(exc.errors()[:1])))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        return _error(request, APIError(500, f"internal error: {type(exc).__name__}"))

    # Read once: a request never reaches the filesystem.
    pages = {route: ((STATIC / name).read_bytes(), mime) for route, (name, mime) in PAGE_FILES.items()}

    def page(route: str):
        async def serve():
            body, mime = pages[route]
            return Response(body, media_type=mime, headers=PAGE_HEADERS)
        return serve

    for route in pages:
        app.add_api_route(route, page(route), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.settings.model_name, **engine.stats()}

    openai_routes.register(app)
    ollama_routes.register(app)

    s = state.settings
    app.add_middleware(AuthGuard, settings=s)
    if s.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(s.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(HostOriginGuard, settings=s)  # outermost
    return app


def load_backend():
    """(load, stream_generate, make_cache) from mlxkt's generation API."""
    import mlxkt

    return mlxkt.load, mlxkt.stream_generate, mlxkt.make_cache


def build_state(model_path: str, *, model_name: Optional[str] = None, context_length: Optional[int] = None,
                prefix_cache: bool = True, backend=None, **settings) -> ServerState:
    """Starts an engine that loads the model, and wires the server state around it.

    `settings`: ServerSettings fields. The caller stops the engine (state.engine.stop()).
    """
    load, stream_generate, make_cache = backend or load_backend()
    path = Path(model_path).expanduser()
    engine = Engine(lambda: load(str(path)), generate_fn=stream_generate, make_cache_fn=make_cache,
                    max_queue=settings.get("max_queue", 32), prefix_cache=prefix_cache)
    engine.start()
    name = model_name or path.resolve().name
    engine.context_length = ctx = context_length_of(read_config(path), engine.tokenizer, context_length)
    s = ServerSettings(model_name=name, context_length=ctx, **settings)
    info = describe(engine.model, engine.tokenizer, path, name, ctx)
    return ServerState(engine, engine.tokenizer, s, info)
