"""GPU tests: each kernel against the reference (skipped without a Metal or CUDA GPU)."""

import mlx.core as mx
import numpy as np
import pytest

from mlxkt.kernels import dispatch
from mlxkt.kernels.dispatch import gpu_backend, routed_experts
from mlxkt.kernels.moe import fused_routed_experts, launch_config
from mlxkt.kernels.dispatch import probe_tolerance
from mlxkt.kernels.probe import (random_problem, random_shared_expert, reference_float32,
                                 relative_error, shared_reference)
from mlxkt.kernels.reference import routed_experts_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")]


def check(D, I, N, K, E, bits, gs, dtype, repeat=True, seed=0, **cfg):
    backend = gpu_backend()
    x, inds, scores, gate, up, down = random_problem(D, I, N, K, E, bits, gs, dtype=dtype,
                                                     seed=seed, repeat=repeat)
    y = fused_routed_experts(x, inds, scores, gate, up, down, backend, **cfg)
    y2 = fused_routed_experts(x, inds, scores, gate, up, down, backend, **cfg)
    ref = reference_float32(x, inds, scores, gate, up, down)  # the reference, upcast inputs
    native = routed_experts_reference(x, inds, scores, gate, up, down)
    mx.eval(y, y2, ref, native)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.isfinite(np.array(y.astype(mx.float32))).all()
    assert mx.array_equal(y, y2)  # no race: same bits every run
    err = relative_error(y, ref)
    assert err < probe_tolerance(dtype), err
    if dtype != mx.float32:  # no worse than the reference computed in the model's dtype
        assert err <= 1.5 * relative_error(native, ref), err
    return err


@pytest.mark.parametrize("N,bits", [(n, 4) for n in range(1, 9)] + [(1, 8), (2, 8), (8, 8)])
def test_deepseek_v3_shapes(N, bits):
    check(7168, 2048, N, 8, 16, (bits, bits), (64, 64), mx.bfloat16, seed=N)


@pytest.mark.parametrize("N,bits,dtype", [(1, 4, mx.bfloat16), (4, 4, mx.bfloat16),
                                          (8, 4, mx.float16), (2, 8, mx.bfloat16),
                                          (1, 4, mx.float32)])
def test_shared_expert_inside_the_launches(N, bits, dtype):
    """DeepSeek-V3's shared expert (one routed expert's shape) in the same two kernels."""
    backend = gpu_backend()
    x, inds, scores, gate, up, down = random_problem(7168, 2048, N, 8, 16, (bits, bits),
                                                     (64, 64), dtype=dtype, seed=N)
    shared = random_shared_expert(gate, up, down, seed=N)
    y = fused_routed_experts(x, inds, scores, gate, up, down, backend, shared)
    y2 = fused_routed_experts(x, inds, scores, gate, up, down, backend, shared)
    ref = reference_float32(x, inds, scores, gate, up, down) + shared_reference(x, shared, True)
    native = routed_experts_reference(x, inds, scores, gate, up, down) + shared(x)
    mx.eval(y, y2, ref, native)
    assert mx.array_equal(y, y2)
    err = relative_error(y, ref)
    assert err < probe_tolerance(dtype), err
    if dtype != mx.float32:
        assert err <= 1.5 * relative_error(native, ref), err


@pytest.mark.parametrize("N", [1, 2])
def test_residual_added_by_stage_2(N):
    """The decode step's MoE residual inside stage 2, with the shared expert inside too."""
    backend = gpu_backend()
    x, inds, scores, gate, up, down = random_problem(7168, 2048, N, 8, 16, (4, 4), (64, 64),
                                                     dtype=mx.bfloat16, seed=N)
    shared = random_shared_expert(gate, up, down, seed=N)
    res = (4 * mx.random.normal(x.shape, key=mx.random.key(11))).astype(mx.bfloat16)
    y = fused_routed_experts(x, inds, scores, gate, up, down, backend, shared, res)
    ref = (reference_float32(x, inds, scores, gate, up, down)
           + shared_reference(x, shared, True) + res.astype(mx.float32))
    native = routed_experts_reference(x, inds, scores, gate, up, down) + shared(x) + res
    err = relative_error(y, ref)
    assert err < probe_tolerance(mx.bfloat16), err
    assert err <= 1.5 * relative_error(native, ref), err


# The H100 sweep's fastest (2026-11-25): the default at <= 4 bits; the old one kept at 8 bits.
SWEPT = {"rw": 2, "rb": 8, "dq": 1}
OLD = {"rw": 1, "rb": 2, "dq": 0}


@pytest.mark.parametrize("N", [1, 2, 8])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_swept_config(N, bits):
    """DeepSeek-V3 shapes (64 pairs at 8 tokens, repeated experts) with the sweep's config."""
    want = SWEPT if bits <= 4 else OLD
    assert launch_config(7168, 2048, bits, bits, pairs=8 * N) == launch_config(
        7168, 2048, bits, bits, pairs=8 * N, **want)
    check(7168, 2048, N, 8, 16, (bits, bits), (64, 64), mx.bfloat16, seed=N, **SWEPT)


@pytest.mark.parametrize("N", [1, 8])
def test_old_defaults_at_4_bits(N):
    check(7168, 2048, N, 8, 16, (4, 4), (64, 64), mx.bfloat16, seed=N, **OLD)


@pytest.mark.parametrize("N", [1, 2, 8])
def test_mixtral_shapes(N):
    check(4096, 14336, N, 2, 4, (4, 4), (64, 64), mx.bfloat16, seed=N)


@pytest.mark.parametrize("bits,gs,N", [((4, 4), (32, 32), 1), ((4, 4), (128, 128), 8),
                                       ((8, 4), (32, 64), 3), ((2, 2), (64, 64), 2),
                                       ((8, 8), (128, 128), 5), ((4, 8), (64, 32), 4)])
def test_bits_and_groups_float32(bits, gs, N):
    check(1024, 512, N, 4, 9, bits, gs, mx.float32, seed=N)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dtypes_and_ragged_rows(dtype):
    # 1088 columns: rows end part-way through a lane's chunks.
    check(1088, 320, 4, 6, 12, (4, 4), (64, 64), dtype)


def test_row_tiles_per_block():
    """Stage-1 blocks walking several row tiles, the last one partial (4 warps x 2 rows:
    320 = 13*3*4*2 + 8)."""
    backend = gpu_backend()
    x, inds, scores, gate, up, down = random_problem(1024, 320, 3, 4, 9, dtype=mx.float32)
    y = fused_routed_experts(x, inds, scores, gate, up, down, backend, rt=3)
    assert relative_error(y, reference_float32(x, inds, scores, gate, up, down)) < 1e-3


def test_distinct_experts_many_pairs():
    check(2048, 1024, 8, 8, 64, (4, 4), (64, 64), mx.bfloat16, repeat=False)


def test_duplicate_expert_within_a_token():
    backend = gpu_backend()
    x, _, scores, gate, up, down = random_problem(512, 256, 2, 3, 5, dtype=mx.float32)
    inds = mx.array([[1, 1, 4], [4, 2, 1]], dtype=mx.uint32)
    y = fused_routed_experts(x, inds, scores, gate, up, down, backend)
    assert relative_error(y, routed_experts_reference(x, inds, scores, gate, up, down)) < 1e-3


def test_dispatch_uses_the_kernel(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    x, inds, scores, gate, up, down = random_problem(1024, 512, 2, 4, 8, dtype=mx.bfloat16)
    y = routed_experts(x[None], inds[None], scores[None], gate, up, down)
    want = fused_routed_experts(x, inds, scores, gate, up, down, gpu_backend())
    assert mx.array_equal(y[0], want)
    monkeypatch.setenv(dispatch.ENV, "0")
    y0 = routed_experts(x, inds, scores, gate, up, down)
    assert mx.array_equal(y0, routed_experts_reference(x, inds, scores, gate, up, down))
