"""mlxkt vs mlx-lm on the same weights: see `python benchmarks/bench.py --help`.

    python benchmarks/bench.py --layers 8 --experts 32 --out results/   # H100-sized slice
    python benchmarks/bench.py --preset tiny --layers 2 --experts 8     # quick CPU run
"""

import sys
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxkt.bench.cli import bench_command  # noqa: E402

if __name__ == "__main__":
    typer.run(bench_command)
