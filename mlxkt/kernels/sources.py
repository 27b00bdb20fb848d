"""Kernel sources per backend, assembled from the files of `mlxkt.metal`.

A kernel is one shared body (`*.inc`) plus a per-backend prelude (thread and block ids) and
header (macros, then the shared helpers of kt_common.h).
"""

from dataclasses import dataclass
from typing import Tuple

try:
    from mlxkt.metal import read_source
except ImportError:  # a source checkout that is not installed: metal/ sits beside mlxkt/
    from pathlib import Path

    def read_source(name: str) -> str:
        return (Path(__file__).resolve().parents[2] / "metal" / name).read_text(encoding="utf-8")

BACKENDS = ("metal", "cuda", "cpu")
HEADERS = {"metal": "kt_metal.h", "cuda": "kt_cuda.h", "cpu": "kt_cpu.h"}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    body: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    # (template key, input): the input is read as raw 16-bit floats (kt_load4) when the key's
    # value is 1 or 2; the CPU emulation then passes its bits instead of floats.
    raw16: Tuple[Tuple[str, str], ...] = ()


GATE_UP = KernelSpec(
    name="mlxkt_moe_gate_up",
    body="moe_gate_up.inc",
    inputs=("x", "inds", "scores", "wg", "sg", "bg", "wu", "su", "bu",
            "wsg", "ssg", "bsg", "wsu", "ssu", "bsu"),
    outputs=("h", "plan", "uw"),
    raw16=(("TK", "x"),),
)

DOWN = KernelSpec(
    name="mlxkt_moe_down",
    body="moe_down.inc",
    inputs=("h", "plan", "uw", "wd", "sd", "bd", "wsd", "ssd", "bsd", "res"),
    outputs=("y",),
)

QGEMV = KernelSpec(
    name="mlxkt_qgemv",
    body="qgemv.inc",
    inputs=("x", "w", "scales", "biases", "g", "res"),
    outputs=("y",),
    raw16=(("TK", "x"), ("GK", "g")),
)


def header(backend: str) -> str:
    return read_source(HEADERS[backend]) + "\n" + read_source("kt_common.h")


def source(backend: str, spec: KernelSpec) -> str:
    # The CPU emulation passes the ids as function arguments instead.
    prelude = "" if backend == "cpu" else read_source(f"prelude_{backend}.inc")
    return prelude + read_source(spec.body)
