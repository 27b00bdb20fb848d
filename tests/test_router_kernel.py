"""The fused DeepSeek router (metal/router.inc) against the plain-MLX reference.

CPU tests run the kernel body through the C++ emulation (mlxkt.kernels.emulate); GPU tests
(`gpu` mark) run it on Metal or CUDA. A float64 NumPy oracle (ties to the lower index)
settles the cases where the reference's argpartition may break ties either way.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlxkt.config import ModelArgs
from mlxkt.kernels import dispatch, emulate, router
from mlxkt.kernels.dispatch import KernelFallbackWarning, gpu_backend
from mlxkt.kernels.router import (GateConfig, fused_route, random_inputs, route_error,
                                  route_numpy)
from mlxkt.layers.moe import DeepseekGate, route_reference

V3 = GateConfig(256, 8, "sigmoid", "noaux_tc", 8, 4, True, 2.5)
V2 = GateConfig(160, 6, "softmax", "group_limited_greedy", 8, 3, False, 16.0)
LITE = GateConfig(64, 6, "softmax", "greedy", 1, 1, False, 1.0)
CONFIGS = {"v3": V3, "v2": V2, "v2-lite": LITE}
TOL = 1e-5  # relative weight error; float32 rounding of exp and sums

needs_gxx = pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20)")


def reference(logits, bias, cfg):
    return route_reference(logits, bias if cfg.biased else None, cfg)


def near_tie_inputs(cfg, N, seed, delta=1e-5):
    """Random routings where the best unselected expert of a kept group is moved to within
    delta of the last selected one: a near tie at the cut, above float32 noise."""
    logits, bias = random_inputs(cfg, N, seed)
    lg, b = np.array(logits).astype(np.float64), np.array(bias).astype(np.float64)
    inds = route_numpy(lg, b, cfg)[0]
    gsz = cfg.n_experts // cfg.n_group if cfg.grouped else cfg.n_experts
    for t in range(N):
        kept = np.isin(np.arange(cfg.n_experts) // gsz, inds[t] // gsz)
        kept[inds[t]] = False
        if cfg.scoring_func == "softmax":  # no bias: the order of the logits decides
            j = int(np.argmax(np.where(kept, lg[t], -np.inf)))
            lg[t, j] = lg[t, inds[t, -1]] - 200 * delta  # scores ~1/E: relative gaps
        else:
            bt = b if cfg.biased else np.zeros_like(b)
            c = 1 / (1 + np.exp(-lg[t])) + bt
            s = c[inds[t, -1]] - delta - bt  # the score that puts each expert at the cut
            kept &= (s > 1e-3) & (s < 1 - 1e-3)
            j = int(np.argmax(np.where(kept, c, -np.inf)))
            lg[t, j] = np.log(s[j] / (1 - s[j]))
    lg = lg.astype(np.float32)
    margin = route_numpy(lg, b, cfg)[2]
    assert np.all((margin > 1e-6) & (margin < 1e-3)), margin  # near, yet decided
    return mx.array(lg), bias


def check_against_reference(cfg, logits, bias, backend, block=None):
    inds, weights = fused_route(logits, bias, cfg, backend, block)
    assert inds.shape == weights.shape == (logits.shape[0], cfg.top_k)
    assert weights.dtype == mx.float32
    ref = reference(logits, bias, cfg)
    oracle = route_numpy(np.array(logits), np.array(bias), cfg)
    assert route_error(inds, weights, *ref) < TOL
    assert route_error(inds, weights, *oracle[:2]) < TOL
    return inds, weights


@needs_gxx
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("N", [1, 2, 8])
def test_emulated_router_matches_reference(name, N):
    cfg = CONFIGS[name]
    logits, bias = random_inputs(cfg, N, seed=N)
    inds, _ = check_against_reference(cfg, logits, bias, "cpu")
    # Experts come by decreasing choice, each once.
    assert all(len(set(r)) == cfg.top_k for r in np.array(inds).tolist())


@needs_gxx
@pytest.mark.parametrize("name", CONFIGS)
def test_emulated_router_near_ties(name):
    cfg = CONFIGS[name]
    logits, bias = near_tie_inputs(cfg, 8, seed=3)
    check_against_reference(cfg, logits, bias, "cpu")


@needs_gxx
@pytest.mark.parametrize("name", ["v3", "v2"])
def test_emulated_router_group_masking(name):
    """Inputs where the best experts overall are not the group-limited choice."""
    cfg = CONFIGS[name]
    logits, bias = random_inputs(cfg, 8, seed=11)
    ungrouped = GateConfig(**{**cfg.__dict__, "n_group": 1, "topk_group": 1})
    flat = route_numpy(np.array(logits), np.array(bias), ungrouped)[0]
    grouped = route_numpy(np.array(logits), np.array(bias), cfg)[0]
    assert any(set(a) != set(b) for a, b in zip(flat.tolist(), grouped.tolist()))
    check_against_reference(cfg, logits, bias, "cpu")


@needs_gxx
def test_emulated_router_top2_group_score():
    """noaux_tc ranks groups by the sum of their top 2: a group holding the single best
    expert but nothing else is dropped, and that expert with it."""
    cfg = V3
    E, G = cfg.n_experts, cfg.n_group
    rng = np.random.default_rng(0)
    logits = rng.uniform(-0.5, 0.5, (1, E)).astype(np.float32)
    logits[0, :E // G] = -6.0  # group 0: all low...
    logits[0, 0] = 6.0  # ...but the best expert overall
    bias = np.zeros(E, dtype=np.float32)
    inds, _ = check_against_reference(cfg, mx.array(logits), mx.array(bias), "cpu")
    assert 0 not in np.array(inds).tolist()[0]


def check_tie_break(cfg, logits, bias):
    """The kernel gives the oracle's routing with ties to the lower index, on inputs where
    ties to the higher index would give another set of experts."""
    E = cfg.n_experts
    inds, weights = fused_route(mx.array(logits), mx.array(bias), cfg, "cpu")
    want = route_numpy(logits, bias, cfg)
    upper = E - 1 - route_numpy(logits[:, ::-1], bias[::-1], cfg)[0]  # ties to the higher
    assert set(upper[0].tolist()) != set(want[0][0].tolist())
    assert np.array_equal(np.sort(np.array(inds)), np.sort(want[0]))
    assert route_error(inds, weights, *want[:2]) < TOL


@needs_gxx
def test_emulated_router_expert_ties_pick_lower_index():
    rng = np.random.default_rng(5)
    half = rng.permutation(np.linspace(-2, 2, 32)).astype(np.float32)
    logits = np.concatenate([half, half])[None]  # expert e ties with e + 32
    logits[0, 32 + int(np.argmax(half))] = -3.0  # a single best, so the cut splits a tie
    check_tie_break(LITE, logits, np.zeros(64, dtype=np.float32))


@needs_gxx
def test_emulated_router_group_ties_pick_lower_index():
    cfg = GateConfig(**{**V3.__dict__, "topk_group": 1})
    half = np.array(random_inputs(V3, 1, seed=2)[0])[:, :128]
    logits = np.concatenate([half, half], axis=1)  # group g ties with group g + 4
    check_tie_break(cfg, logits, np.zeros(256, dtype=np.float32))


@needs_gxx
def test_emulated_router_threads_loop_over_experts():
    """Fewer threads than experts (each thread walks several), and the same bits."""
    logits, bias = random_inputs(V3, 2, seed=4)
    full = fused_route(logits, bias, V3, "cpu")
    small = check_against_reference(V3, logits, bias, "cpu", block=64)
    assert mx.array_equal(full[0], small[0]) and mx.array_equal(full[1], small[1])


def test_unsupported_configs():
    assert router.unsupported(V3) is None and router.unsupported(LITE) is None
    assert router.unsupported(GateConfig(2048, 8, "sigmoid", "greedy", 1, 1, True, 1.0))
    assert router.unsupported(GateConfig(256, 8, "tanh", "greedy", 1, 1, True, 1.0))
    assert router.unsupported(GateConfig(250, 8, "sigmoid", "noaux_tc", 8, 4, True, 1.0))
    assert router.unsupported(GateConfig(64, 8, "sigmoid", "noaux_tc", 32, 2, True, 1.0))


def gate_args(cfg, D=32):
    return ModelArgs(model_type="deepseek_v3", vocab_size=8, hidden_size=D, num_hidden_layers=1,
                     num_attention_heads=1, n_routed_experts=cfg.n_experts,
                     num_experts_per_tok=cfg.top_k, routed_scaling_factor=cfg.routed_scaling_factor,
                     topk_method=cfg.topk_method, scoring_func=cfg.scoring_func,
                     norm_topk_prob=cfg.norm_topk_prob, n_group=cfg.n_group,
                     topk_group=cfg.topk_group)


def random_gate(cfg, seed=0, D=32):
    gate = DeepseekGate(gate_args(cfg, D))
    k1, k2 = mx.random.split(mx.random.key(seed))
    gate.weight = mx.random.normal(gate.weight.shape, key=k1) / D**0.5  # logits ~ N(0, 1)
    if cfg.biased:
        gate.e_score_correction_bias = 0.2 * mx.random.normal((cfg.n_experts,), key=k2)
    return gate


@pytest.mark.parametrize("name", CONFIGS)
def test_deepseek_gate_unchanged_on_cpu(name):
    """On the CPU the gate runs the plain ops: exactly route_reference, no warning."""
    if gpu_backend() is not None:
        pytest.skip("the default device is a GPU")
    cfg = CONFIGS[name]
    gate = random_gate(cfg)
    assert GateConfig.from_gate(gate) == cfg
    x = mx.random.normal((2, 3, 32), key=mx.random.key(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        inds, weights = gate(x)
    logits = (x @ gate.weight.T).astype(mx.float32)
    ref = route_reference(logits, gate.get("e_score_correction_bias"), cfg)
    assert inds.dtype == mx.uint32 and inds.shape == (2, 3, cfg.top_k)
    assert mx.array_equal(inds, ref[0]) and mx.array_equal(weights, ref[1])
    bias = np.array(gate["e_score_correction_bias"]) if cfg.biased else 0.0
    oracle = route_numpy(np.array(logits).reshape(6, -1), bias, cfg)
    assert route_error(inds, weights, *oracle[:2]) < TOL


@needs_gxx
def test_gate_dispatch_through_probe(monkeypatch):
    """The whole dispatch (probe included) with the emulation standing in for a GPU."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(router, "gpu_backend", lambda: "cpu")
    router.router_ready.cache_clear()
    gate = random_gate(V3, seed=2)
    x = mx.random.normal((1, 2, 32), key=mx.random.key(3))
    logits = (x @ gate.weight.T).astype(mx.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelFallbackWarning)
            inds, weights = gate(x)
        want = fused_route(logits, gate.e_score_correction_bias, V3, "cpu")
        assert mx.array_equal(inds, want[0]) and mx.array_equal(weights, want[1])
        assert router.route(gate, mx.zeros((1, 65, 256))) is None  # prefill: plain ops
        monkeypatch.setenv(dispatch.ENV, "0")
        assert router.route(gate, logits) is None
    finally:
        router.router_ready.cache_clear()


def test_gate_falls_back_when_the_kernel_fails(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(router, "gpu_backend", lambda: "cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("does not compile")

    monkeypatch.setattr(router, "probe", broken)
    router.router_ready.cache_clear()
    gate = random_gate(V2, seed=4)
    x = mx.random.normal((1, 1, 32), key=mx.random.key(5))
    try:
        with pytest.warns(KernelFallbackWarning, match="router kernel failed"):
            inds, weights = gate(x)
    finally:
        router.router_ready.cache_clear()
    ref = route_reference((x @ gate.weight.T).astype(mx.float32), None, V2)
    assert mx.array_equal(inds, ref[0]) and mx.array_equal(weights, ref[1])


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("N", [1, 2, 8, 64])
def test_gpu_router_matches_reference(name, N):
    cfg = CONFIGS[name]
    backend = gpu_backend()
    for logits, bias in (random_inputs(cfg, N, seed=N), near_tie_inputs(cfg, N, seed=N)):
        a = check_against_reference(cfg, logits, bias, backend)
        b = fused_route(logits, bias, cfg, backend)
        assert mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])  # no race


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() is None, reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_gate_uses_the_kernel(name, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    cfg = CONFIGS[name]
    gate = random_gate(cfg, seed=6, D=64)
    x = mx.random.normal((1, 3, 64), key=mx.random.key(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        inds, weights = gate(x)
    logits = (x @ gate.weight.T).astype(mx.float32)
    bias = gate.get("e_score_correction_bias")
    want = fused_route(logits, bias, cfg, gpu_backend())
    assert mx.array_equal(inds, want[0]) and mx.array_equal(weights, want[1])
    # Against the reference where no near tie makes the choice depend on rounding.
    ref = route_reference(logits, bias, cfg)
    lg = np.array(logits).reshape(-1, cfg.n_experts)
    decided = route_numpy(lg, np.array(bias) if cfg.biased else 0.0, cfg)[2] > 1e-5
    assert decided.any()
    K = cfg.top_k
    rows = [np.array(a.astype(mx.float32)).reshape(-1, K)[decided]
            for a in (inds, weights, *ref)]
    assert route_error(*rows) < TOL
