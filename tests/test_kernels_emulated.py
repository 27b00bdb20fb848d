"""The kernel bodies themselves, run on the CPU by the C++ emulation (mlxkt.kernels.emulate).

Same source as the Metal and CUDA kernels (with kt_cpu.h's macros), so these tests check the
plan, the indexing, the dequantization and the reductions without a GPU.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlxkt.kernels import dispatch, emulate, moe
from mlxkt.kernels.dispatch import KernelFallbackWarning, routed_experts
from mlxkt.kernels.moe import fused_routed_experts
from mlxkt.kernels.dispatch import probe_tolerance
from mlxkt.kernels.probe import (random_problem, random_shared_expert, reference_float32,
                                 relative_error, shared_reference)
from mlxkt.kernels.reference import routed_experts_reference

pytestmark = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")


def tolerance(bits_d, cfg):
    """dq = 1 (the default at <= 4 bits) loses up to 8 of float32's 24 bits (kt_common.h)."""
    dq = cfg.get("dq", 1 if bits_d <= 4 else 0)
    return 1e-4 if dq and bits_d < 8 else 1e-5


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
    assert relative_error(y, ref) < tolerance(bits[1], {})


def test_emulated_row_tiles_per_block():
    """Stage-1 blocks that walk several row tiles (used when there are many pairs)."""
    x, inds, scores, gate, up, down = random_problem(128, 192, 3, 2, 5, seed=7)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu", rt=5)  # 192 = 9*20 + 12
    ref = routed_experts_reference(x, inds, scores, gate, up, down)
    assert relative_error(y, ref) < tolerance(4, {})


def check_variant(D, N, bits, cfg, I=192, K=4, E=6):
    """On repeated experts (shared slots), against the reference."""
    x, inds, scores, gate, up, down = random_problem(D, I, N, K, E, bits, (64, 64), seed=N)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu", **cfg)
    assert not np.isnan(np.array(y)).any()
    ref = routed_experts_reference(x, inds, scores, gate, up, down)
    assert relative_error(y, ref) < tolerance(bits[1], cfg)


# The H100 sweep's fastest (2026-11-25), the default at <= 4 bits, at every width.
SWEPT = {"rw": 2, "rb": 8, "dq": 1}


@pytest.mark.parametrize("N", [1, 2, 8])
@pytest.mark.parametrize("b", [2, 4, 8])
def test_emulated_swept_config(N, b):
    if b <= 4:  # the defaults resolve to it
        assert moe.launch_config(320, 192, b, b) == moe.launch_config(320, 192, b, b, **SWEPT)
    check_variant(320 if N < 8 else 1088, N, (b, b), SWEPT)


@pytest.mark.parametrize("D,N,bits,cfg", [
    (320, 1, (4, 4), {"rw": 1, "rb": 2, "dq": 0}),       # the 8-bit defaults at 4 bits
    (320, 2, (4, 8), {"rt": 2}),                         # 8-bit down: its own defaults
    (320, 8, (2, 4), {"dq": 0, "nw": (8, 8)}),
    (320, 2, (8, 2), {"nw": (8, 8), "rb": 1}),           # 8-bit gate/up, 2-bit down (dq 1)
    (1088, 8, (4, 4), {"rw": 1, "rt": 3, "sa": 1}),      # 2 load stages, ragged row tiles
    (1088, 1, (8, 8), {"dq": 1, "nw": (8, 4), "rb": 4, "ue": 3, "sb": 1}),
    (320, 2, (4, 4), {"rb": 1, "ue": 8}),                # 8 experts per stage-2 load step
    (320, 8, (4, 8), {"rw": 3, "rt": 2}),                # rows ragged inside a warp
    (1088, 2, (4, 4), {"nw": (4, 3)}),                   # stage-2 rows ragged in a block
    (1088, 2, (2, 2), {"rw": 4, "rt": 2, "rb": 4, "sb": 2}),
    (320, 2, (4, 4), {"xc": 1}),                         # x as a float32 chunk-major copy
    (1088, 8, (8, 4), {"xc": 1, "rw": 1}),
    (320, 1, (4, 4), {"xs": 1}),                         # stage 2: warps split the experts
    (1088, 2, (4, 4), {"xs": 1, "nw": (4, 3), "ue": 2}),  # uneven split, 2 experts a step
    (320, 8, (2, 8), {"xs": 1, "nw": (4, 8), "rb": 3}),  # more warps than some tokens' experts
])
def test_emulated_launch_variants(D, N, bits, cfg):
    """Other variants benchmarks/kernels.py --sweep times."""
    check_variant(D, N, bits, cfg)


@pytest.mark.parametrize("inds", [[[1, 1, 4], [4, 2, 1]], [[3, 0, 3]]])
def test_emulated_duplicate_expert_within_a_token(inds):
    """Not produced by top-k, but legal input: both router weights must count (one token
    takes stage 1's plan-free path, two tokens the plan)."""
    inds = mx.array(inds, dtype=mx.uint32)
    x, _, scores, gate, up, down = random_problem(128, 64, inds.shape[0], 3, 5)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu")
    ref = routed_experts_reference(x, inds, scores, gate, up, down)
    assert relative_error(y, ref) < tolerance(4, {})


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


# --- the shared expert inside the routed kernels' launches, x read in its own type --------

@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("N,bits,gs", [
    (1, (4, 4), (64, 64)),
    (2, (8, 4), (32, 128)),
    (3, (2, 8), (64, 32)),
])
def test_emulated_shared_expert_rides_along(N, bits, gs, dtype):
    x, inds, scores, gate, up, down = random_problem(256, 128, N, 4, 6, bits, gs, dtype=dtype,
                                                     seed=N)
    shared = random_shared_expert(gate, up, down, seed=N)
    ref = reference_float32(x, inds, scores, gate, up, down)
    with_shared = ref + shared_reference(x, shared, float32=True)
    tol = tolerance(bits[1], {}) if dtype == mx.float32 else probe_tolerance(dtype)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu")
    assert relative_error(y, ref) < tol  # without it (bf16 x: the raw 16-bit reads)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu", shared)
    assert not np.isnan(np.array(y.astype(mx.float32))).any()
    assert relative_error(y, with_shared) < tol
    # stage 2's warps splitting the experts: the shared one goes to the least busy warp
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu", shared, xs=1, nw=(4, 3))
    assert relative_error(y, with_shared) < tol
    assert relative_error(ref, with_shared) > 10 * tol  # the shared part is not negligible


@pytest.mark.parametrize("xs", [0, 1])
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_emulated_stage_2_adds_the_residual(with_shared, dtype, xs):
    x, inds, scores, gate, up, down = random_problem(256, 128, 2, 4, 6, (4, 4), (64, 64),
                                                     dtype=dtype, seed=3)
    shared = random_shared_expert(gate, up, down, seed=3) if with_shared else None
    res = (5 * mx.random.normal(x.shape, key=mx.random.key(4))).astype(dtype)
    ref = reference_float32(x, inds, scores, gate, up, down) + res.astype(mx.float32)
    if shared is not None:
        ref = ref + shared_reference(x, shared, float32=True)
    y = fused_routed_experts(x, inds, scores, gate, up, down, "cpu", shared, res, xs=xs)
    assert y.dtype == dtype and not np.isnan(np.array(y.astype(mx.float32))).any()
    tol = tolerance(4, {}) if dtype == mx.float32 else probe_tolerance(dtype)
    assert relative_error(y, ref) < tol
    assert relative_error(y - res.astype(y.dtype), ref) > 10 * tol  # it was added


def test_dispatch_adds_the_residual_inside_or_after(monkeypatch):
    """routed_experts(..., residual): inside stage 2 when nothing else is left to add,
    after the kernels when a shared expert stays outside them."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "cpu")
    seen = []
    real = dispatch.fused_routed_experts
    monkeypatch.setattr(dispatch, "fused_routed_experts",
                        lambda *a, **k: seen.append(a[8] is not None) or real(*a, **k))
    dispatch.kernel_ready.cache_clear()
    x, inds, scores, gate, up, down = random_problem(128, 64, 2, 2, 4)
    shared = random_shared_expert(gate, up, down)
    res = mx.random.normal(x.shape, key=mx.random.key(2))
    try:
        inside = routed_experts(x, inds, scores, gate, up, down, shared=shared, residual=res)
        after = routed_experts(x, inds, scores, gate, up, down, shared=shared,
                               fuse_shared=False, residual=res)
        plain = routed_experts(x, inds, scores, gate, up, down, residual=res)
    finally:
        dispatch.kernel_ready.cache_clear()
    assert seen == [True, False, True]
    ref = routed_experts_reference(x, inds, scores, gate, up, down) + res
    assert relative_error(plain, ref) < 1e-4
    assert relative_error(inside, ref + shared(x)) < 1e-4
    assert relative_error(after, ref + shared(x)) < 1e-4


def test_dispatch_fuses_a_shared_expert_of_one_experts_shape(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "cpu")
    seen = []
    real = dispatch.fused_routed_experts
    monkeypatch.setattr(dispatch, "fused_routed_experts",
                        lambda *a, **k: seen.append(a[7] if len(a) > 7 else None) or real(*a, **k))
    dispatch.kernel_ready.cache_clear()
    x, inds, scores, gate, up, down = random_problem(128, 64, 2, 2, 4)
    shared = random_shared_expert(gate, up, down)
    *_, gate2, up2, down2 = random_problem(128, 128, 2, 2, 4, seed=5)
    wide = random_shared_expert(gate2, up2, down2)  # 128 hidden units: not one expert's shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelFallbackWarning)
            fused = routed_experts(x, inds, scores, gate, up, down, shared=shared)
            apart = routed_experts(x, inds, scores, gate, up, down, shared=shared,
                                   fuse_shared=False)
            routed = routed_experts(x, inds, scores, gate, up, down)
            with_wide = routed_experts(x, inds, scores, gate, up, down, shared=wide)
    finally:
        dispatch.kernel_ready.cache_clear()
    assert seen == [shared, None, None, None]
    assert shared.fits_routed[1] and not wide.fits_routed[1]  # decided once per MLP
    assert relative_error(fused, apart) < 1e-5
    assert mx.allclose(apart, routed + shared(x))
    assert mx.allclose(with_wide, routed + wide(x))


def test_model_decodes_the_same_through_the_emulated_moe_kernels(monkeypatch):
    """A 4-bit tiny DeepSeek-V3 decoding with the router and routed-expert kernels (shared
    expert inside them), emulated, against plain MLX ops."""
    from mlxkt.kernels import router
    from tiny_models import greedy_logits as greedy, quantized_tiny

    model = quantized_tiny()
    monkeypatch.setenv(dispatch.ENV, "0")
    plain = greedy(model)
    monkeypatch.delenv(dispatch.ENV)
    monkeypatch.setattr(dispatch, "gpu_backend", lambda: "cpu")
    monkeypatch.setattr(router, "gpu_backend", lambda: "cpu")
    seen = []
    real = dispatch.fused_routed_experts
    monkeypatch.setattr(dispatch, "fused_routed_experts",
                        lambda *a, **k: seen.append(a[7] is not None) or real(*a, **k))
    dispatch.kernel_ready.cache_clear()
    router.router_ready.cache_clear()
    try:
        with mx.stream(mx.cpu):
            fast = greedy(model)
    finally:
        dispatch.kernel_ready.cache_clear()
        router.router_ready.cache_clear()
    assert seen == [True] * 2 * 4  # 2 MoE layers x (5-token prefill + 3 one-token steps)
    assert mx.array_equal(fast.argmax(-1), plain.argmax(-1))
    assert relative_error(fast, plain) < 1e-4


@pytest.mark.parametrize("fused_rows", [False, True])
def test_compiled_decode_folds_norms_and_residuals_into_the_kernels(monkeypatch, fused_rows):
    """The compiled decode step (run uncompiled, so the emulated kernels can run in it) hands
    the input and q_a RMSNorms to the GEMV kernel, both residuals to the o_proj GEMV and
    stage 2 of the expert kernels, and the rest of the attention prologue to the MLA prep
    kernel; its logits match plain MLX ops. With fused_rows q_a and kv_a are one launch
    (layers/fused_rows.py, as the loader does on CUDA)."""
    from mlxkt.inject import optimize
    from mlxkt.kernels import gate_norm, mla_prep, qgemv, qgemv_lanes, router
    from mlxkt.layers import mla
    from mlxkt.layers.decode_compile import set_compiled_decode
    from mlxkt.layers.fused_rows import fuse_shared_inputs
    from mlxkt.layers.moe import DeepseekMoE
    from tiny_models import greedy_logits as greedy, quantized_tiny

    model = quantized_tiny()
    monkeypatch.setenv(dispatch.ENV, "0")
    plain = greedy(model)
    monkeypatch.delenv(dispatch.ENV)
    for mod in (dispatch, router, mla, gate_norm):
        monkeypatch.setattr(mod, "gpu_backend", lambda: "cpu")
    monkeypatch.setenv(mla_prep.ENV, "1")
    monkeypatch.setenv(gate_norm.ENV, "1")
    normed = []
    real_gate_norm = gate_norm.gate_norm
    monkeypatch.setattr(gate_norm, "gate_norm",
                        lambda h, *a: normed.append(h.shape[:-1]) or real_gate_norm(h, *a))
    preps = []
    real_prep = mla_prep.mla_prep

    def prep(q, kv, norm, offset, *rest):
        if not (isinstance(offset, int) and offset == 30011):  # not the one-time probes
            preps.append(q.shape[1])
        return real_prep(q, kv, norm, offset, *rest)

    monkeypatch.setattr(mla_prep, "mla_prep", prep)
    folds, residuals = [], []
    real_gemv, real_moe = qgemv.quantized_gemv, dispatch.fused_routed_experts
    monkeypatch.setattr(qgemv, "quantized_gemv", lambda x, layer, b, norm=None, residual=None:
                        folds.append((layer.weight.shape[0], norm is not None, residual is not None))
                        or real_gemv(x, layer, b, norm, residual))
    monkeypatch.setattr(dispatch, "fused_routed_experts",
                        lambda *a, **k: residuals.append(a[8] is not None) or real_moe(*a, **k))
    heads = []  # per-head embed_q / unembed_out: (weight, query rows)
    real_lanes = qgemv_lanes.lanes_gemv
    monkeypatch.setattr(qgemv_lanes, "lanes_gemv", lambda x, w, *a, **k:
                        heads.append((id(w), x.shape[1])) or real_lanes(x, w, *a, **k))
    optimize(model, linears=True)
    if fused_rows:
        assert fuse_shared_inputs(model) == len(model.layers)
    set_compiled_decode(model, True)
    readies = (dispatch.kernel_ready, dispatch.gemv_ready, router.router_ready, mla.prep_ready,
               gate_norm.ready, dispatch.lanes_ready)
    for ready in readies:
        ready.cache_clear()
    mx.disable_compile()
    try:
        with mx.stream(mx.cpu):
            fast = greedy(model)
    finally:
        mx.enable_compile()
        for ready in readies:
            ready.cache_clear()
    attn = model.layers[0].self_attn
    q_a, kv_a, q_b = (attn.q_a_proj.weight.shape[0], attn.kv_a_proj_with_mqa.weight.shape[0],
                      attn.q_b_proj.weight.shape[0])
    o = attn.o_proj.weight.shape[0]
    down = {(q_a + kv_a, True, False)} if fused_rows else {(q_a, True, False), (kv_a, True, False)}
    assert down | {(q_b, True, False), (o, False, True)} <= set(folds)
    assert fused_rows == ((q_a, True, False) not in folds)
    assert True in residuals  # the MoE layers' residual inside stage 2
    moe_layers = sum(isinstance(layer.mlp, DeepseekMoE) for layer in model.layers)
    # norm + logits in one launch for the prompt and each step, eager (priming) or compiled
    assert moe_layers and normed.count((1, 1)) == 3 * moe_layers, normed
    assert normed.count((1, 5)) == moe_layers
    layers = len(model.layers)
    assert preps == [5] * layers + [1] * 3 * layers  # the prompt (absorbed) and each step
    mine = {id(getattr(la.self_attn, n).weight) for la in model.layers
            for n in ("embed_q", "unembed_out")}
    assert sorted(L for w, L in heads if w in mine) == [1] * 6 * layers + [5] * 2 * layers
    assert mx.array_equal(fast.argmax(-1), plain.argmax(-1))
    assert relative_error(fast, plain) < 1e-4
