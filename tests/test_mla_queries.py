"""The MLA queries kernel (metal/mla_queries.inc): q_b_proj, the query rope and embed_q of one
decode token in one launch, plus the cache entry. The body runs on the CPU through the C++
emulation; the `gpu` tests run the real kernel at DeepSeek-V3's widths and in the engine."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from mlxkt.kernels import emulate, mla_prep, mla_queries, moe, qgemv, qgemv_lanes
from mlxkt.kernels.dispatch import gpu_backend, probe_tolerance
from mlxkt.kernels.mla_prep import rope_table
from mlxkt.kernels.probe import relative_error
from tiny_models import quantized_tiny

emulated = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")

YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def check(backend, widths, qb, qe, dtype, scaling, traditional, offset, tol, **config):
    H, QA, nope, P, R = widths
    rope = initialize_rope(P, base=10000, traditional=traditional,
                           max_position_embeddings=163840, scaling_config=scaling)
    problem = mla_queries.random_problem(H, QA, nope, P, R, qb, qe, dtype, seed=offset % 7)
    got = mla_queries.mla_queries(*problem, rope_table(rope, P), offset, H, nope, P, 0.17,
                                  backend, **config)
    want = mla_queries.reference(*mla_queries.float32(*problem), rope, offset, H, nope, P, 0.17)
    for name, a, b in zip(("q_lat", "q_pe", "latent", "k_pe"), got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert not np.isnan(np.array(a.astype(mx.float32))).any(), name  # all written
        assert relative_error(a, b) < tol, (name, relative_error(a, b))
    return problem, rope, got, want


@emulated
@pytest.mark.parametrize("qb,qe,scaling,traditional,offset,config", [
    ((4, 32), (4, 32), None, True, 0, {}),
    ((8, 32), (4, 32), None, False, 17, {"nw": 2, "rq": 5}),  # rows past the end
    ((4, 64), (8, 32), YARN, True, 5000, {"nw": 1, "rq": 1}),  # YaRN's input scale
    ((2, 64), (4, 32), YARN, True, 100000, {}),                          # large angles
])
def test_emulated_kernel_matches_the_mlx_ops(qb, qe, scaling, traditional, offset, config):
    check("cpu", (3, 128, 32, 16, 64), qb, qe, mx.float32, scaling, traditional, offset, 3e-5,
          **config)


@emulated
def test_emulated_bfloat16_and_an_array_offset():
    check("cpu", (2, 64, 32, 8, 32), (4, 32), (4, 32), mx.bfloat16, None, True, 321,
          probe_tolerance(mx.bfloat16))
    problem = mla_queries.random_problem(2, 64, 32, 8, 32, (4, 32), (4, 32))
    table = rope_table(nn.RoPE(8, traditional=True), 8)
    a = mla_queries.mla_queries(*problem, table, 321, 2, 32, 8, 0.5, "cpu")
    b = mla_queries.mla_queries(*problem, table, mx.array([321], mx.int32), 2, 32, 8, 0.5, "cpu")
    assert all(mx.array_equal(x, y).item() for x, y in zip(a, b))


def test_unsupported_calls():
    a, q_b, q_norm, embed_q, kv_norm = mla_queries.random_problem(2, 64, 32, 8, 32, (4, 32),
                                                                   (4, 32))
    table = rope_table(nn.RoPE(8, traditional=True), 8)
    x = mx.zeros((1, 1, 16))
    assert mla_queries.unsupported(x, q_b, q_norm, embed_q, kv_norm, table, 2, 32, 8) == ""
    assert mla_queries.unsupported(mx.zeros((1, 2, 16)), q_b, q_norm, embed_q, kv_norm, table,
                                   2, 32, 8)  # two tokens
    assert mla_queries.unsupported(x, q_b, q_norm, embed_q, kv_norm, None, 2, 32, 8)
    assert mla_queries.unsupported(x, q_b, nn.LayerNorm(64), embed_q, kv_norm, table, 2, 32, 8)
    assert mla_queries.unsupported(x, nn.Linear(64, 80), q_norm, embed_q, kv_norm, table, 2, 32,
                                   8)
    assert mla_queries.unsupported(x, q_b, q_norm, embed_q, kv_norm, table, 4, 32, 8)  # heads
    q_b.bias = mx.zeros((q_b.weight.shape[0],))
    assert mla_queries.unsupported(x, q_b, q_norm, embed_q, kv_norm, table, 2, 32, 8) == \
        "q_b_proj has a bias"
    with pytest.raises(ValueError, match="not one token"):
        mla_queries.mla_queries(mx.concatenate([a, a], 1), q_b, q_norm, embed_q, kv_norm, table,
                                0, 2, 32, 8, 0.5, "cpu")


def test_backend_default_and_switch(monkeypatch):
    monkeypatch.setattr(mla_queries, "gpu_backend", lambda: "cuda")
    monkeypatch.delenv(mla_queries.ENV, raising=False)
    assert mla_queries.backend_for() == "cuda" and mla_queries.backend_for(False) is None
    monkeypatch.setenv(mla_queries.ENV, "0")
    assert mla_queries.backend_for() is None and mla_queries.backend_for(True) == "cuda"
    monkeypatch.setattr(mla_queries, "gpu_backend", lambda: "metal")
    monkeypatch.delenv(mla_queries.ENV)
    assert mla_queries.backend_for() is None  # not measured on a Mac: asked for only
    monkeypatch.setenv(mla_queries.ENV, "1")
    assert mla_queries.backend_for() == "metal"
    monkeypatch.setattr(mla_queries, "gpu_backend", lambda: None)
    assert mla_queries.backend_for(True) is None


@pytest.fixture
def queries_here(monkeypatch):
    """The GPU's kernels, or on a machine without one their C++ emulation, with a record of
    the kernels each call launches (by their names)."""
    from mlxkt.kernels import dispatch
    from mlxkt.layers import mla

    checks = (dispatch.lanes_ready, mla.prep_ready, mla_queries.ready)
    launched = []
    if dispatch.gpu_backend() is None:
        if not emulate.available():
            pytest.skip("needs a GPU or g++ (C++20)")
        for module in (dispatch, mla, mla_queries):
            monkeypatch.setattr(module, "gpu_backend", lambda: "cpu")
        monkeypatch.setenv("MLXKT_MLA_PREP", "1")
        monkeypatch.setenv(mla_queries.ENV, "1")
        for f in checks:  # no verdicts of the real backend's checks
            f.cache_clear()
        real = moe.kernel_fn

        def recording(backend, spec):
            run = real(backend, spec)
            return lambda **kw: launched.append(spec.name) or run(**kw)

        for module in (mla_prep, mla_queries, qgemv, qgemv_lanes):
            monkeypatch.setattr(module, "kernel_fn", recording)
    yield launched
    for f in checks:
        f.cache_clear()


def test_the_engine_takes_one_launch_after_the_down_projections(queries_here):
    """MLAttention.absorbed_queries(rows=True) of one token with the kernel gives what the
    three launches gave (q_b_proj, the prologue, embed_q), with no slice nodes between."""
    from mlxkt.bench.measure import graph_ops
    from mlxkt.inject import optimize
    from mlxkt.layers.fused_rows import fuse_shared_inputs

    model = quantized_tiny()
    optimize(model, rules=(), linears=True)  # the kernels' linears, as the loader makes them
    assert fuse_shared_inputs(model) > 0
    layer = model.layers[0]
    attn = layer.self_attn
    x, pos = model.model.embed_tokens(mx.array([[3]])), mx.array([5], mx.int32)
    mx.eval(x, pos)
    out, kernels, ops = {}, {}, {}
    for on in (False, True):
        attn.queries_kernel = on
        attn.absorbed_queries(x, pos, norm=layer.input_layernorm, rows=True)  # checks kernels
        queries_here.clear()
        out[on] = attn.absorbed_queries(x, pos, norm=layer.input_layernorm, rows=True)
        kernels[on] = list(queries_here)
        # one graph of the four outputs, so that shared nodes count once
        ops[on] = graph_ops(mx.concatenate([a.reshape(-1) for a in out[on]]))
    for a, b in zip(out[False], out[True]):
        assert a.shape == b.shape
        assert relative_error(b, a) < 1e-5
    if gpu_backend() is None:  # the emulated kernels' outputs come evaluated: count launches
        assert kernels[True] == ["mlxkt_qgemv", "mlxkt_mla_queries"]
        assert len(kernels[False]) == 4
    else:
        assert ops[True].count("CustomKernel") == ops[False].count("CustomKernel") - 2
        assert "Slice" in ops[False] and "Slice" not in ops[True]


@emulated
def test_selftest_row_on_the_emulation():
    rows = mla_queries.selftest("cpu", echo=lambda *a: None, heads=2)
    assert [(r["kernel"], r["status"]) for r in rows] == [("mla-queries", "pass")]


# --- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("scaling,offset,config", [(YARN, 1023, {}), (None, 32767, {}),
                                                   (YARN, 4000, {"nw": 16, "rq": 3})])
def test_gpu_kernel_at_deepseek_v3_widths(scaling, offset, config):
    """128 heads, 1536 q_a values, 128 + 64 query dims, 512-wide latent, 4-bit group 64, bf16:
    as close to float32 as MLX's own bf16 ops are."""
    problem, rope, got, want = check(gpu_backend(), (128, 1536, 128, 64, 512), (4, 64), (4, 64),
                                     mx.bfloat16, scaling, True, offset,
                                     probe_tolerance(mx.bfloat16), **config)
    native = mla_queries.reference(*problem, rope, offset, 128, 128, 64, 0.17)
    for a, n, b in zip(got, native, want):
        assert relative_error(a, b) <= 1.5 * relative_error(n, b) + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
def test_gpu_compiled_decode_takes_the_kernel(monkeypatch):
    """The compiled decode step runs the kernel (checked at its eager first step, since a
    check cannot evaluate inside a trace): two kernels fewer a layer, the same logits."""
    import warnings

    from mlxkt.bench.measure import graph_ops
    from mlxkt.inject import optimize
    from mlxkt.kernels.dispatch import KernelFallbackWarning
    from mlxkt.layers.decode_compile import set_compiled_decode
    from mlxkt.layers.fused_rows import fuse_shared_inputs

    monkeypatch.setenv(mla_queries.ENV, "1")  # on Apple GPUs too
    mla_queries.ready.cache_clear()
    counts, logits = {}, {}
    for on in (False, True):
        model = quantized_tiny()
        optimize(model, rules=(), linears=True)
        fuse_shared_inputs(model)
        for layer in model.layers:
            layer.self_attn.queries_kernel = on
        set_compiled_decode(model)
        cache = model.make_cache()
        steps = []
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelFallbackWarning)
            y = model(mx.array([[5, 17, 3, 99]]), cache=cache)[:, -1]
            for _ in range(4):
                y = model(y.argmax(-1)[:, None], cache=cache)[:, -1]
                ops = graph_ops(y)
                mx.eval(y)
                steps.append(y)
        counts[on], logits[on] = ops.count("CustomKernel"), mx.stack(steps)
    assert counts[True] == counts[False] - 2 * len(model.layers)
    assert mx.allclose(logits[True], logits[False], atol=1e-3, rtol=1e-3).item()
