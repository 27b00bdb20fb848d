"""Kernel sources (Metal and CUDA), shipped as package data of `mlxkt.metal`.

One kernel body per kernel (`*.inc`), written against a few macros; each backend header
(`kt_metal.h`, `kt_cuda.h`, `kt_cpu.h` for the CPU emulation used by the tests) defines them.
"""

from importlib import resources


def read_source(name: str) -> str:
    """The text of one source file of this package, e.g. read_source("moe_down.inc")."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
