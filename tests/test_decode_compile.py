"""The compiled decode path (layers/decode_compile.py) against the eager layers."""

import mlx.core as mx
import pytest

from mlxkt.bench import measure
from mlxkt.generate import generate_step
from mlxkt.loader import device_passes
from mlxkt.layers.decode_compile import compile_default, eager_decode, set_compiled_decode
from mlxkt.speculative import SpecStats
from mlxkt.demo import DEMO_CONFIG
from tiny_models import attach_random_mtp, deepseek_tiny, quantized_tiny, random_model

PROMPT = mx.array([[5, 17, 99, 42, 7, 250, 31, 8, 19]])
# DeepSeek-V2-Lite style: no q LoRA, softmax greedy routing.
V2_LITE = dict(DEMO_CONFIG, model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax",
               topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False)


def steps(model, tokens):
    """Logits of a prefill, then of one-token and two-token cached steps."""
    cache = model.make_cache()
    out = [model(PROMPT, cache=cache)]
    for t in tokens:
        out.append(model(mx.array([t]), cache=cache))
    return out


@pytest.mark.parametrize("config", [DEMO_CONFIG, V2_LITE], ids=["v3", "v2-lite"])
def test_compiled_steps_equal_eager(config, cpu_device):
    # On the CPU device also on a GPU machine, where float32 matmuls round like TF32 and the
    # compiled one-token steps attend over the whole cache buffer (layers/cache_buffer.py),
    # a matmul of another shape than the eager one's.
    model = random_model(config)
    tokens = [[3], [9], [4, 11], [12], [6, 2], [1]]  # every shape twice: primed, then compiled
    eager = steps(model, tokens)
    set_compiled_decode(model)
    calls = []
    for layer in model.layers:  # count the calls that take the compiled path
        fast = layer.compiled_decode
        fast.pre = {r: (lambda f: lambda *a: calls.append(1) or f(*a))(f)
                    for r, f in fast.pre.items()}
    compiled = steps(model, tokens)
    # the prefill (9 tokens) and the first 1- and 2-token steps prime; 4 steps are compiled
    assert len(calls) == 4 * len(model.layers)
    for a, b in zip(eager, compiled):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()
    set_compiled_decode(model, False)
    assert all(layer.compiled_decode is None for layer in model.layers)


def test_compiled_mtp_greedy_identical(cpu_device):
    # On the CPU device also on a GPU machine: there the 2-token verify steps and the 1-token
    # steps use different float32 matmul kernels, and this random model's greedy choice
    # flipped once the short prompt prefilled as 1-token steps (H200, 2026-11-26).
    model = attach_random_mtp(deepseek_tiny())
    plain = [t for t, *_ in generate_step(PROMPT[0], model, max_tokens=20, mtp=False)]
    set_compiled_decode(model)
    assert model.mtp.layers[0].compiled_decode is not None
    st = SpecStats()
    spec = [t for t, *_ in generate_step(PROMPT[0], model, max_tokens=20, spec_stats=st)]
    assert spec == plain and st.cycles > 0


def graph_ops(y) -> list:
    return sorted(measure.graph_ops(y))


def test_lazy_constants_stay_out_of_compiled_steps():
    """mlx-lm's YaRN rope builds its frequencies lazily: traced while still unevaluated they
    became part of every compiled step (2 aranges and a power per layer on a GPU)."""
    def compiled_step_ops(evaluate_priming: bool):
        model = random_model(DEMO_CONFIG)  # YaRN rope
        device_passes(model, compile=True)
        y = model(mx.array([[2]]), cache=model.make_cache())  # primes the 1-token shape
        if evaluate_priming:
            mx.eval(y)
        cache = model.make_cache()
        return graph_ops(model(mx.array([[7]]), cache=cache))  # traced now

    assert compiled_step_ops(False) == compiled_step_ops(True)


def test_default_on_cuda_only_unless_asked(monkeypatch):
    monkeypatch.delenv("MLXKT_COMPILE", raising=False)
    on_cuda = mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()
    assert compile_default() == on_cuda
    monkeypatch.setenv("MLXKT_COMPILE", "0")
    assert not compile_default()
    monkeypatch.setenv("MLXKT_COMPILE", "1")
    assert compile_default()


@pytest.mark.gpu
@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.gpu, reason="needs a GPU")
def test_compiled_decode_with_kernels_on_gpu(monkeypatch):
    from mlxkt.kernels import dispatch, router

    if dispatch.gpu_backend() is None or not dispatch.kernels_enabled():
        pytest.skip("no Metal/CUDA kernels here")
    used = {"experts": 0, "router": 0}

    def counting(fn, key):
        def wrapped(*args, **kw):
            used[key] += 1
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(dispatch, "fused_routed_experts",
                        counting(dispatch.fused_routed_experts, "experts"))
    monkeypatch.setattr(router, "fused_route", counting(router.fused_route, "router"))
    model = quantized_tiny()
    tokens = [[3], [9], [4, 11], [12], [6, 2], [1], [7]]
    eager = steps(model, tokens)
    eager_greedy = [t for t, *_ in generate_step(PROMPT[0], model, max_tokens=12, mtp=False)]
    set_compiled_decode(model)
    compiled = steps(model, tokens)
    assert used["experts"] > 0 and used["router"] > 0  # the kernels ran, in eager and in traces
    for a, b in zip(eager, compiled):
        assert mx.allclose(a, b, atol=1e-3, rtol=1e-3).item()
    assert [t for t, *_ in generate_step(PROMPT[0], model, max_tokens=12, mtp=False)] == eager_greedy


def test_eager_decode_block_restores_the_state():
    model = random_model(DEMO_CONFIG)
    with eager_decode(model) as was:  # off before: stays off
        assert was is False
    assert all(layer.compiled_decode is None for layer in model.layers)
    set_compiled_decode(model)
    with eager_decode(model) as was:
        assert was is True
        assert all(layer.compiled_decode is None for layer in model.layers)
    assert all(layer.compiled_decode is not None for layer in model.layers)


def test_layers_share_one_position_array_per_step():
    model = deepseek_tiny()
    set_compiled_decode(model)
    shared = {id(layer.compiled_decode.steps) for layer in model.layers}
    assert len(shared) == 1
    steps_obj = model.layers[0].compiled_decode.steps
    made = []
    real = steps_obj.get
    steps_obj.get = lambda n, key, make, **kw: real(n, key, lambda: made.append((n, key)) or make(), **kw)
    steps(model, [[3], [9], [4], [12]])  # the first 1-token step primes (eager)
    # one per step, not per layer; on CUDA each step also makes its key bias once
    # (layers/cache_buffer.py)
    assert [m for m in made if m[1] == "offset"] == [(10, "offset"), (11, "offset"), (12, "offset")]
    biases = [n for n, key in made if key != "offset"]
    assert biases in ([], [10, 11, 12])


def test_decode_pieces_add_no_view_nodes_around_their_matmuls():
    """MLX's host builds and walks every graph node of a decode step, views too (~3 µs each
    on an H200): the per-head matmuls take [H, L, *] (no broadcasts) and the router's
    logits a held W^T (no transpose, flatten, unflatten)."""
    model = quantized_tiny()
    mx.eval(model.parameters())
    layer = next(layer for layer in model.layers if hasattr(layer.mlp, "gate"))
    attn, gate = layer.self_attn, layer.mlp.gate
    H, r = attn.num_heads, attn.kv_lora_rank
    out = mx.random.normal((1, H, 1, r))
    mx.eval(out)
    assert "Broadcast" not in graph_ops(attn.absorbed_output(out))
    x = mx.random.normal((1, 1, gate.weight.shape[1]))
    mx.eval(x)
    gate.weight_t()  # held and evaluated before the step (the priming call does this)
    ops = graph_ops(x.reshape(-1, x.shape[-1]) @ gate.weight_t())
    assert ops == ["Matmul", "Reshape"]
    assert gate.weight_t() is gate.weight_t()  # one view, made once
