"""`mlxkt serve`: light command function (heavy imports happen only when it runs)."""

from typing import Optional

import typer
from typing_extensions import Annotated


def serve_command(
    model: Annotated[str, typer.Argument(help="Converted MLX model directory.")],
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback needs --api-key or --insecure.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(envvar="MLXKT_API_KEY", help="Require 'Authorization: Bearer <key>' on the API.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback bind without an API key.")] = False,
    allowed_origins: Annotated[Optional[str], typer.Option(help="Comma-separated browser origins allowed by CORS (default: none).")] = None,
    allowed_hosts: Annotated[Optional[str], typer.Option(help="Comma-separated extra Host header names to accept ('*': any).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait behind the running one; more get 503.")] = 32,
    max_body_kb: Annotated[int, typer.Option(help="Largest request body accepted, in KiB (413 above).")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Default completion length when a request sets none.")] = 2048,
    context_length: Annotated[Optional[int], typer.Option(help="Context length (default: the model config's).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Name clients must use (default: the directory name).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    distributed: Annotated[Optional[str], typer.Option(help="One rank of `mlxkt launch`: pipeline or experts (rank 0 answers HTTP).")] = None,
) -> None:
    """Serve a model over OpenAI- and Ollama-compatible HTTP APIs, with a chat page at /."""
    from .settings import check_bind, split_list

    try:
        check_bind(host, api_key, insecure)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    for name, value, low in (("--max-queue", max_queue, 1), ("--max-body-kb", max_body_kb, 1),
                             ("--max-tokens", max_tokens, 1), ("--port", port, 0)):
        if value < low:
            typer.echo(f"error: {name} must be at least {low}", err=True)
            raise typer.Exit(2)

    backend = None
    if distributed:
        import mlxkt
        from mlxkt.distributed import env_rank, setup

        if env_rank() != 0:
            setup(model, distributed)  # follows rank 0 until it stops, then exits
        backend = (lambda p: setup(p, distributed), mlxkt.stream_generate, mlxkt.make_cache)

    import uvicorn

    from .app import build_state, create_app

    state = build_state(
        model, model_name=model_name, context_length=context_length, backend=backend,
        host=host, port=port, api_key=api_key or None, insecure=insecure,
        allowed_origins=split_list(allowed_origins), allowed_hosts=split_list(allowed_hosts),
        max_queue=max_queue, max_body_bytes=max_body_kb * 1024, default_max_tokens=max_tokens,
    )
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"mlxkt: serving {state.settings.model_name!r} (context {state.engine.context_length}) "
               f"on http://{shown}:{port}  chat page: /  OpenAI: /v1  Ollama: /api")
    try:
        # Connections beyond the queue's needs get 503 from uvicorn before reaching the app.
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level, server_header=False,
                    limit_concurrency=max(64, 4 * max_queue), timeout_graceful_shutdown=5)
    finally:
        state.engine.stop()
