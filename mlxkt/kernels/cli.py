"""`mlxkt selftest`: check the GPU kernels against the reference on this machine."""

from typing import Optional

import typer


def _ints(text: str):
    return tuple(int(v) for v in text.split(",") if v.strip())


def selftest_command(
    shape: Optional[str] = typer.Option(
        None, help="deepseek-v3 or mixtral-8x7b (default: both)"),
    bits: str = typer.Option("4,8", help="weight bits to test, comma-separated"),
    tokens: str = typer.Option("1,4", help="token counts to test, comma-separated"),
    experts: Optional[int] = typer.Option(
        None, help="fewer experts than the real model, to save memory"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the rows here"),
):
    """Run each available kernel against the reference; print pass/fail, error and speed."""
    import json

    from mlxkt.kernels.selftest import selftest

    rows = selftest(shapes=[shape] if shape else None, bits=_ints(bits), tokens=_ints(tokens),
                    experts=experts, echo=typer.echo)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=1)
    if any(r["status"] == "FAIL" for r in rows):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(selftest_command)
