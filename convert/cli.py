"""`mlxkt convert SRC DST`: the typer command (registered by mlxkt/cli.py). No heavy imports
here so `mlxkt --help` stays instant; the converter is imported when the command runs."""

from typing import Optional

import typer


def convert_command(
    src: str = typer.Argument(..., help="Source: a local checkpoint directory or a Hugging Face repo id."),
    dst: str = typer.Argument(..., help="Output directory (must not exist unless --force)."),
    bits: int = typer.Option(4, "--bits", help="Quantization bits: 2, 3, 4, 5, 6 or 8."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size: 32, 64 or 128."),
    no_quantize: bool = typer.Option(False, "--no-quantize", help="Keep weights unquantized (see --dtype)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Float dtype of unquantized tensors, scales and biases: bfloat16, float16, float32."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Mixed precision recipe: uniform (default) or deepseek-mixed."),
    force: bool = typer.Option(False, "--force", help="Replace an existing destination."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted conversion, re-using its verified shards."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hugging Face revision (branch, tag or commit) of a repo id."),
):
    """Convert a Hugging Face DeepSeek-V3/R1, V2 or Mixtral checkpoint (FP8 or bf16) to MLX,
    streaming tensor by tensor in bounded memory."""
    from .core import convert
    from .errors import ConvertError

    try:
        convert(src, dst, bits=bits, group_size=group_size, quantize=not no_quantize, dtype=dtype,
                recipe=recipe, force=force, resume=resume, revision=revision, progress=True)
    except ConvertError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
