"""Shared pytest fixtures: tiny released-layout checkpoints, their conversions, shared data.

Checkpoints are built once per session (see tests/checkpoints.py) into a temporary directory.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# pyproject installs convert/ as mlxkt.convert and metal/ as mlxkt.metal; in an uninstalled
# checkout this finder gives the same mapping (an installed package is found first).
SOURCE_SUBPACKAGES = {"mlxkt.convert": "convert", "mlxkt.metal": "metal"}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        sub = SOURCE_SUBPACKAGES.get(name)
        init = REPO / sub / "__init__.py" if sub else None
        if init is None or not init.exists():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(REPO / sub)]
        )


if not any(isinstance(f, SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.append(SourceTreeFinder())


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when MLX runs on its CPU backend."""
    if not any("gpu" in item.keywords for item in items):
        return
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        skip = pytest.mark.skip(reason="needs a Metal or CUDA GPU (MLX default device is CPU)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def cpu_device():
    """Run on MLX's CPU device, also on a GPU machine: for tests that need exact float32
    agreement between differently batched steps (on a GPU, a 1-token step and a 2-token
    verify step use different matmul kernels and round differently)."""
    import mlx.core as mx

    old = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(old)


@pytest.fixture(scope="session")
def shared_fixture_dir() -> Path:
    """The trained tiny DeepSeek-V3 (../shared/fixtures/dsv3-code-tiny), or skip."""
    path = SHARED / "fixtures" / "dsv3-code-tiny"
    if not path.is_dir():
        pytest.skip(f"shared fixture absent: {path}")
    return path


@pytest.fixture(scope="session")
def released_checkpoint(tmp_path_factory):
    """Factory: (family, fp8=False) -> (released checkpoint dir, float32 torch twin), cached."""
    from checkpoints import build_checkpoint

    built = {}

    def get(family: str, fp8: bool = False):
        key = (family, fp8)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{family}{'-fp8' if fp8 else ''}-src")
            built[key] = build_checkpoint(family, out, fp8=fp8)
        return built[key]

    return get


@pytest.fixture(scope="session")
def converted_checkpoint(tmp_path_factory, released_checkpoint):
    """Factory: (family, fp8=False, quantize=False) -> mlxkt-converted directory, cached.

    Unquantized conversions are float32 (compared against the float32 torch twin); quantized
    ones use the converter's default recipe at 4 bits, group 64.
    """
    converted = {}

    def get(family: str, fp8: bool = False, quantize: bool = False):
        key = (family, fp8, quantize)
        if key not in converted:
            from mlxkt.convert import convert

            src, _ = released_checkpoint(family, fp8)
            tag = f"{family}{'-fp8' if fp8 else ''}-{'q4' if quantize else 'f32'}"
            dst = tmp_path_factory.mktemp(tag) / "mlx"
            opts = dict(bits=4, group_size=64) if quantize else {}
            convert(src, dst, quantize=quantize, dtype="float32", progress=False, **opts)
            converted[key] = dst
        return converted[key]

    return get


@pytest.fixture(scope="session")
def converted_shared_fixture(tmp_path_factory, shared_fixture_dir):
    """Factory: (variant "bf16" | "fp8", quantize=False) -> the trained tiny DeepSeek-V3
    converted by mlxkt (float32, or 4-bit group 64), cached."""
    converted = {}

    def get(variant: str, quantize: bool = False):
        key = (variant, quantize)
        if key not in converted:
            from mlxkt.convert import convert

            tag = f"dsv3-code-tiny-{variant}-{'q4' if quantize else 'f32'}"
            dst = tmp_path_factory.mktemp(tag) / "mlx"
            opts = dict(bits=4, group_size=64) if quantize else {}
            convert(shared_fixture_dir / variant, dst, quantize=quantize, dtype="float32",
                    progress=False, **opts)
            converted[key] = dst
        return converted[key]

    return get
