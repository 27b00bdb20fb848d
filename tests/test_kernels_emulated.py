"""The kernel bodies themselves, run on the CPU by the C++ emulation (mlxkt.kernels.emulate).

Same source as the Metal and CUDA kernels (with kt_cpu.h's macros), so these tests check the
plan, the indexing, the dequantization and the reductions without a GPU.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlxkt.kernels import dispatch, emulate
from mlxkt.kernels.dispatch import KernelFallbackWarning, routed_experts
from mlxkt.kernels.moe import fused_routed_experts
from mlxkt.kernels.probe import random_problem, relative_error
from mlxkt.kernels.reference import routed_experts_reference

pytestmark = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")


@pytest.mark.parametrize("D,I,N,K,E,bits,gs", [
    (256, 128, 1, 2, 4, (4, 4), (64, 64)),      # decode
    (128, 128, 3, 4, 6, (8, 4), (32, 128)),     # shared experts, mixed bits
    (1088, 96, 2, 2, 8, (4, 8), (64, 32)),      # rows that end inside a lane's chunks
    (256, 64, 8, 8, 10, (2, 4), (64, 64)),      # 64 pairs over 10 experts
])
def test_emulated_kernels_match_reference(D, I, N, K, E, bits, gs):
    x, inds, scores, gate, up, down = random_problem(D, I, N, K, E, bits, gs, seed=N)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu")
    assert not np.isnan(np.array(y)).any()  # outputs are poisoned before the run
    ref = routed_experts_reference(x, inds, scores, gate, up, down)
    assert relative_error(y, ref) < 1e-5


def test_emulated_row_tiles_per_block():
    """Stage-1 blocks that walk several row tiles (used when there are many pairs)."""
    x, inds, scores, gate, up, down = random_problem(128, 192, 3, 2, 5, seed=7)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu", rt=5)  # 192 = 9*20 + 12
    ref = routed_experts_reference(x, inds, scores, gate, up, down)
    assert relative_error(y, ref) < 1e-5


def test_emulated_duplicate_expert_within_a_token():
    """Not produced by top-k, but legal input: both router weights must count."""
    x, _, scores, gate, up, down = random_problem(128, 64, 2, 3, 5)
    inds = mx.array([[1, 1, 4], [4, 2, 1]], dtype=mx.uint32)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu")
    ref = routed_experts_reference(x, inds, scores, gate, up, down)
    assert relative_error(y, ref) < 1e-5


def test_dispatch_runs_the_kernel_through_its_probe(monkeypatch):
    """The full dispatch path (probe included) with the emulation as the GPU backend."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "cpu")
    dispatch.kernel_ready.cache_clear()
    x, inds, scores, gate, up, down = random_problem(128, 64, 2, 2, 4, dtype=mx.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelFallbackWarning)
            y = routed_experts(x.reshape(1, 2, 128), inds.reshape(1, 2, 2),
                               scores.reshape(1, 2, 2), gate, up, down)
    finally:
        dispatch.kernel_ready.cache_clear()
    assert y.shape == (1, 2, 128)
    want = fused_routed_experts(x, inds, scores, gate, up, down, "cpu")
    assert mx.array_equal(y.reshape(2, 128), want)
