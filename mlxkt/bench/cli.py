"""`mlxkt bench`: light command function (MLX is imported only when it runs)."""

from typing import Optional

import typer


def _ints(s: str):
    return [int(x) for x in s.split(",") if x.strip()] if s else []


def _names(s: str):
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def bench_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Converted MLX directory; default: a synthetic slice."),
    preset: str = typer.Option("dsv3", help="Synthetic widths: dsv3 (real DeepSeek-V3) or tiny."),
    layers: int = typer.Option(8, help="Synthetic: number of layers."),
    experts: int = typer.Option(32, help="Synthetic: routed experts per layer."),
    top_k: Optional[int] = typer.Option(None, help="Synthetic: experts per token (default 8)."),
    dense_layers: int = typer.Option(0, help="Synthetic: leading dense (non-MoE) layers."),
    vocab: Optional[int] = typer.Option(None, help="Synthetic: vocabulary size (default the preset's)."),
    bits: int = typer.Option(4, help="Synthetic: quantization bits."),
    prefill: str = typer.Option("512,4096", help="Prompt lengths to time prefill at."),
    contexts: str = typer.Option("1024,8192", help="Contexts to time decode at."),
    decode_tokens: int = typer.Option(32, help="Decode tokens timed per context."),
    repeats: int = typer.Option(2, help="Interleaved repeats of each measurement (best kept)."),
    breakdown: str = typer.Option("1024", help="Contexts for the per-component breakdown ('' for none)."),
    breakdown_prefill: str = typer.Option("", help="Prefill chunk sizes to break down too (e.g. 512)."),
    breakdown_reps: int = typer.Option(10, help="Replays per component in the breakdown."),
    engines: str = typer.Option("mlxkt,mlx-lm", help="Engines to run."),
    variants: str = typer.Option("", help="Experimental mlxkt variants to add (mlxkt.bench.variants)."),
    dtype: Optional[str] = typer.Option(None, help="mlxkt activation dtype (default: its own choice)."),
    mlx_lm_dtype: Optional[str] = typer.Option(None, help="Cast mlx-lm's floats to this dtype (default: as loaded)."),
    max_seconds: Optional[float] = typer.Option(None, help="Skip measurements once this much time has passed."),
    workdir: Optional[str] = typer.Option(None, help="Where the synthetic model is written (default: a temp dir)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Folder for bench.json, bench.txt, bench.png."),
    commit: Optional[str] = typer.Option(None, help="Commit to record (default: git rev-parse)."),
):
    """Benchmark mlxkt against mlx-lm on the same weights: prefill, decode vs context,
    bandwidth use, memory, per-component breakdown. JSON + table (+ PNG with --out)."""
    import json
    from pathlib import Path

    from .report import plot, table
    from .runner import BenchOptions, run_bench

    o = BenchOptions(model=model, preset=preset, layers=layers, experts=experts, top_k=top_k,
                     dense_layers=dense_layers, vocab=vocab, bits=bits, prefill=_ints(prefill),
                     contexts=_ints(contexts), decode_tokens=decode_tokens, repeats=repeats,
                     breakdown_contexts=_ints(breakdown), breakdown_reps=breakdown_reps,
                     breakdown_prefill=_ints(breakdown_prefill), engines=_names(engines),
                     variants=_names(variants), dtype=dtype, mlx_lm_dtype=mlx_lm_dtype,
                     max_seconds=max_seconds, workdir=workdir, out=out, commit=commit)
    result = run_bench(o, log=lambda s: typer.echo(s, err=True))
    text = table(result)
    typer.echo(text)
    if out:
        (Path(out) / "bench.txt").write_text(text + "\n")
        if plot(result, Path(out) / "bench.png"):
            typer.echo(f"plot: {Path(out) / 'bench.png'}", err=True)
    else:
        typer.echo(json.dumps(result["ratios"], indent=1))
