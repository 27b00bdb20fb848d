"""The `mlxkt` command line. Each command imports its implementation lazily so that
`mlxkt --help` never loads MLX."""

import importlib
import sys
from typing import Optional

import typer

app = typer.Typer(
    help="mlxkt: DeepSeek-class mixture-of-experts inference on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = typer.Option(..., "--model", "-m", help="Converted MLX model directory.")


def _sampling(temp, top_p, top_k, min_p):
    from .sampling import Sampling

    return Sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)


MtpOpt = typer.Option(
    None, "--mtp/--no-mtp", show_default="on GPUs",
    help="Speculative decoding with the model's MTP layer, when it has one. Off by default on "
    "CPUs, where MLX's matmul cost grows with the tokens verified at once.")
DraftOpt = typer.Option(1, "--draft-tokens", min=1, max=8, help="Tokens the MTP layer drafts per step.")
DistOpt = typer.Option(None, "--distributed", help="One rank of `mlxkt launch`: pipeline or experts.")


def _load_errors():
    from .loader import ModelLoadError
    from .models import UnsupportedModelError

    return (ModelLoadError, UnsupportedModelError, FileNotFoundError)


def _fail(e: Exception):
    typer.echo(f"mlxkt: error: {e}", err=True)
    raise typer.Exit(1)


@app.command()
def generate(
    model: str = ModelOpt,
    prompt: str = typer.Option("-", "--prompt", "-p", help="Prompt text, or - for stdin."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temp: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    min_p: float = typer.Option(0.0),
    seed: Optional[int] = typer.Option(None),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    no_chat_template: bool = typer.Option(False, help="Send the prompt as is."),
    hide_thinking: bool = typer.Option(False, help="Do not print R1's <think> section."),
    mtp: Optional[bool] = MtpOpt,
    draft_tokens: int = DraftOpt,
    distributed: Optional[str] = DistOpt,
):
    """Generate text from a prompt; text to stdout, statistics to stderr."""
    from .chat import run_generate

    try:
        run_generate(model, prompt, system=system, use_template=not no_chat_template,
                     max_tokens=max_tokens, sampling=_sampling(temp, top_p, top_k, min_p),
                     seed=seed, hide_thinking=hide_thinking, mtp=mtp, draft_tokens=draft_tokens,
                     distributed=distributed)
    except _load_errors() as e:
        _fail(e)


@app.command()
def chat(
    model: str = ModelOpt,
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n"),
    temp: float = typer.Option(0.6),
    top_p: float = typer.Option(0.95),
    top_k: int = typer.Option(0),
    min_p: float = typer.Option(0.0),
    seed: Optional[int] = typer.Option(None),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    no_chat_template: bool = typer.Option(False),
    hide_thinking: bool = typer.Option(False, help="Do not print R1's <think> section."),
    mtp: Optional[bool] = MtpOpt,
    draft_tokens: int = DraftOpt,
    distributed: Optional[str] = DistOpt,
):
    """Multi-turn chat that keeps the KV cache between turns."""
    from .chat import run_chat

    try:
        run_chat(model, system=system, use_template=not no_chat_template, max_tokens=max_tokens,
                 sampling=_sampling(temp, top_p, top_k, min_p), seed=seed,
                 hide_thinking=hide_thinking, mtp=mtp, draft_tokens=draft_tokens,
                 distributed=distributed)
    except _load_errors() as e:
        _fail(e)


@app.command()
def info(model: str = ModelOpt, json_out: bool = typer.Option(False, "--json")):
    """Parameters, bytes, bits per weight, KV bytes per token, and whether it fits here."""
    import json

    from .device import memory_bytes
    from .info import format_info, model_info

    try:
        data = model_info(model)
    except (OSError, ValueError, KeyError) as e:
        _fail(e)
    mem = memory_bytes()
    typer.echo(json.dumps({**data, "machine_memory": mem}) if json_out else format_info(data, mem))


@app.command()
def demo(
    workdir: Optional[str] = typer.Option(None, help="Keep the demo files here."),
    max_tokens: int = typer.Option(32, "--max-tokens", "-n"),
):
    """Build a tiny random DeepSeek-V3 checkpoint (FP8, released layout), convert, generate."""
    from .demo import run_demo

    run_demo(workdir, max_tokens)


# Commands implemented by other subpackages: (name, module, function).
EXTERNAL = [
    ("convert", "mlxkt.convert.cli", "convert_command"),
    ("launch", "mlxkt.distributed.cli", "launch_command"),
    ("bench", "mlxkt.bench.cli", "bench_command"),
    ("serve", "mlxkt.server.cli", "serve_command"),
    ("selftest", "mlxkt.kernels.cli", "selftest_command"),
]
for _name, _mod, _fn in EXTERNAL:
    try:
        app.command(_name)(getattr(importlib.import_module(_mod), _fn))
    except ImportError:  # that part of the package is not installed
        pass


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"{message}", file=file or sys.stderr)


def main():
    import warnings

    warnings.showwarning = _one_line_warnings  # users see our messages, not source lines
    app()


if __name__ == "__main__":
    sys.exit(main())
