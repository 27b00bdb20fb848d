"""Compiled one-token decode steps that attend over the cache's whole buffer
(layers/cache_buffer.py) against the eager path over exactly the valid keys."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mlxkt.demo import DEMO_CONFIG
from mlxkt.layers import cache_buffer
from mlxkt.layers.decode_compile import set_compiled_decode
from mlxkt.layers.mla import MLAttention
from mlxkt.layers.mla_scores import addmm_attention
from tiny_models import quantized_tiny, random_model


def filled_cache(rows: int, width=(8, 4)) -> KVCache:
    cache = KVCache()
    cache.keys = mx.arange(rows * width[0], dtype=mx.float32).reshape(1, 1, rows, width[0])
    cache.values = -mx.arange(rows * width[1], dtype=mx.float32).reshape(1, 1, rows, width[1])
    cache.offset = rows
    return cache


def test_reserve_grows_to_whole_steps_and_keeps_the_entries():
    cache = filled_cache(700)  # an unaligned buffer, as KVCache leaves one after a trim
    old_k, old_v = cache.keys, cache.values
    one_k, one_v = mx.zeros((1, 1, 1, 8)), mx.zeros((1, 1, 1, 4))
    cache_buffer.reserve(cache, one_k, one_v)
    assert cache.keys.shape == (1, 1, 768, 8) and cache.values.shape == (1, 1, 768, 4)
    assert mx.array_equal(cache.keys[..., :700, :], old_k).item()
    assert mx.array_equal(cache.values[..., :700, :], old_v).item()
    assert not cache.keys[..., 700:, :].any().item() and cache.offset == 700
    grown = cache.keys
    cache_buffer.reserve(cache, one_k, one_v)  # room left: nothing changes
    assert cache.keys is grown

    empty = KVCache()
    cache_buffer.reserve(empty, mx.zeros((2, 1, 3, 8), mx.bfloat16), mx.zeros((2, 1, 3, 4)))
    assert empty.keys.shape == (2, 1, 256, 8) and empty.keys.dtype == mx.bfloat16
    assert empty.values.shape == (2, 1, 256, 4) and empty.offset == 0


def test_write_and_attend_matches_attention_over_the_valid_keys(cpu_device):
    H, r, P, rows, pos = 4, 16, 8, 256, 100
    ks = mx.random.split(mx.random.key(0), 6)
    q, q_pe = mx.random.normal((1, H, 1, r), key=ks[0]), mx.random.normal((1, H, 1, P), key=ks[1])
    latent, k_pe = mx.random.normal((1, 1, 1, r), key=ks[2]), mx.random.normal((1, 1, 1, P), key=ks[3])
    # Rows past pos hold stale entries (after a trim): the bias must give them no weight.
    keys = 3 * mx.random.normal((1, 1, rows, r), key=ks[4])
    values = 3 * mx.random.normal((1, 1, rows, P), key=ks[5])
    bias = cache_buffer.key_bias(rows, H, mx.float32)(mx.array([pos], mx.int32))
    out, k2, v2 = cache_buffer.write_and_attend(q.reshape(1, 1, H, r), q_pe.reshape(1, 1, H, P),
                                                latent, k_pe, keys, values,
                                                mx.array([pos], mx.int32), bias, 0.3)
    assert mx.array_equal(k2[..., pos:pos + 1, :], latent).item()
    assert mx.array_equal(v2[..., pos:pos + 1, :], k_pe).item()
    assert mx.array_equal(k2[..., :pos, :], keys[..., :pos, :]).item()
    valid = slice(0, pos + 1)
    ref = addmm_attention(q, q_pe, k2[..., valid, :], k2[..., valid, :], v2[..., valid, :], 0.3)
    assert out.shape == (1, 1, H, r)  # the heads as rows, as the queries came
    assert mx.allclose(out.reshape(1, H, 1, r), ref, atol=1e-5, rtol=1e-5).item()


def steps(model, prompt_len: int, n: int):
    """Logits of a prompt, then of n one-token steps, and the caches."""
    cache = model.make_cache()
    prompt = (mx.arange(prompt_len) * 7 % 200 + 3)[None]
    out = [model(prompt, cache=cache)[:, -1]]
    for t in range(n):
        out.append(model(mx.array([[t * 13 % 200 + 1]]), cache=cache))
    return out, cache


@pytest.mark.parametrize("static", [False, True], ids=["array-position", "static-write"])
def test_compiled_buffer_steps_equal_eager_across_a_buffer_growth(cpu_device, monkeypatch, static):
    model = random_model(DEMO_CONFIG)
    eager, eager_cache = steps(model, 250, 10)  # the buffers grow at 256 entries
    set_compiled_decode(model)
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.buffer_attention, m.static_cache_write = True, static
    calls = []
    real = cache_buffer.attend_buffer
    monkeypatch.setattr(cache_buffer, "attend_buffer",
                        lambda *a, **kw: calls.append(a[2].shape[2]) or real(*a, **kw))
    buffered, cache = steps(model, 250, 10)
    layers = len(model.layers)
    # traced once per buffer size and layer: 256 rows, then 512 (the first step primes)
    assert calls == [256] * layers + [512] * layers
    for a, b in zip(eager, buffered):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()
    for c, e in zip(cache, eager_cache):
        assert c.offset == e.offset == 260 and c.keys.shape[2] == 512
        assert mx.allclose(c.keys[..., :260, :], e.keys[..., :260, :], atol=1e-5, rtol=1e-5).item()
        assert mx.allclose(c.values[..., :260, :], e.values[..., :260, :], atol=1e-5, rtol=1e-5).item()


def test_only_plain_one_token_steps_take_the_buffer():
    cache = KVCache()
    assert cache_buffer.applies(cache, None, 1)
    assert not cache_buffer.applies(cache, mx.ones((2, 2), mx.bool_), 2)
    assert not cache_buffer.applies(None, None, 1)

    class Other(KVCache):
        pass

    assert not cache_buffer.applies(Other(), None, 1)


@pytest.mark.parametrize("value,want", [("1", True), ("0", False)])
def test_switch(monkeypatch, value, want):
    monkeypatch.setenv(cache_buffer.ENV, value)
    assert cache_buffer.enabled() is want
    assert cache_buffer.enabled(not want) is (not want)


def set_buffer(model, on: bool, static: bool = True):
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.buffer_attention, m.static_cache_write = on, static


@pytest.mark.gpu
@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.gpu, reason="needs a GPU")
@pytest.mark.parametrize("static", [False, True], ids=["array-position", "static-write"])
def test_buffer_steps_on_the_gpu_agree_with_the_valid_keys_path(static):
    """With the GPU kernels (GEMV, MLA prologue, experts) in the compiled step, as decode
    runs on CUDA by default; float32 matmuls there round like TF32, hence the tolerance."""
    model = quantized_tiny()
    set_compiled_decode(model)
    set_buffer(model, False)
    ref, _ = steps(model, 250, 10)
    set_buffer(model, True, static)
    got, cache = steps(model, 250, 10)
    assert cache[0].keys.shape[2] == 512
    assert model.layers[0].compiled_decode.buffered[0] == (512, static)  # the buffer path ran
    for a, b in zip(ref, got):
        assert mx.allclose(a, b, atol=1e-3, rtol=1e-3).item()
        assert mx.array_equal(a.argmax(-1), b.argmax(-1)).item()


@pytest.fixture
def kernels_here(monkeypatch):
    """The GPU's kernels, or on a machine without one their C++ emulation (kernels/emulate.py:
    their outputs come evaluated, but shaped as the GPU kernels declare them)."""
    from mlxkt.kernels import dispatch, emulate
    from mlxkt.layers import mla

    checks = (dispatch.lanes_ready, mla.prep_ready)
    if dispatch.gpu_backend() is None:
        if not emulate.available():
            pytest.skip("needs a GPU or g++ (C++20)")
        for module in (dispatch, mla):
            monkeypatch.setattr(module, "gpu_backend", lambda: "cpu")
        monkeypatch.setenv("MLXKT_MLA_PREP", "1")
        for f in checks:  # no verdicts of the real backend's checks
            f.cache_clear()
    yield
    for f in checks:
        f.cache_clear()


def test_the_rows_layout_drops_the_view_nodes_around_the_attention(kernels_here):
    """With the kernels, a buffer step's queries come as the attention's rows and its output
    goes to unembed_out as it is: no view nodes (the [B, H, L, *] layout has an expand and
    two reshapes here, three reshapes more in the attention; on a GPU, where nothing comes
    evaluated, 6 view nodes a layer; MLX's host spends ~3 µs on every node of a step)."""
    from mlxkt.bench.measure import graph_ops
    from mlxkt.inject import optimize

    model = quantized_tiny()
    optimize(model, rules=(), linears=True)  # the kernels' linears, as the loader makes them
    set_compiled_decode(model)
    attn = model.layers[0].self_attn
    x, pos = model.model.embed_tokens(mx.array([[3]])), mx.array([5], mx.int32)
    mx.eval(x, pos)
    views, values = {}, {}
    for rows in (False, True):
        attn.absorbed_queries(x, pos, rows=rows)  # first calls check the kernels
        q_lat, q_pe, _, _ = attn.absorbed_queries(x, pos, rows=rows)
        out = mx.arange(q_lat.size, dtype=q_lat.dtype).reshape(q_lat.shape) / q_lat.size
        mx.eval(out)
        assert q_pe.shape[1:3] == ((1, attn.num_heads) if rows else (attn.num_heads, 1))
        y = attn.absorbed_output(out, residual=x, rows=rows)
        views[rows] = sum(op in ("Reshape", "ExpandDims")
                          for op in graph_ops(q_lat) + graph_ops(q_pe) + graph_ops(y))
        values[rows] = [a.reshape(-1) for a in (q_lat, q_pe, y)]
    assert views[True] == 0 < views[False]
    for a, b in zip(values[False], values[True]):  # the same numbers in either layout
        assert mx.array_equal(a, b).item()


def test_the_attention_adds_no_broadcast_nodes():
    """mx.addmm broadcasts a bias of another shape than its output (a Broadcast node, and a
    copy kernel per layer on CUDA): key_bias makes it at the score rows' shape."""
    from mlxkt.bench import measure

    H, r, P, rows = 4, 16, 8, 256
    pos = mx.array([7], mx.int32)
    arrays = [mx.zeros(s) for s in [(1, 1, H, r), (1, 1, H, P), (1, 1, 1, r), (1, 1, 1, P),
                                    (1, 1, rows, r), (1, 1, rows, P)]]
    bias = cache_buffer.key_bias(rows, H, mx.float32)(pos)
    mx.eval(arrays, bias)
    out, _, _ = cache_buffer.write_and_attend(*arrays, pos, bias, 0.5)
    ops = measure.op_counts(measure.graph_ops(out))
    assert "Broadcast" not in ops and "Reshape" not in ops and ops["AddMM"] == 2
