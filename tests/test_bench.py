"""`mlxkt bench` on a tiny synthetic DeepSeek-V3 (CPU smoke test; no timing assertions)."""

import json

import mlx.core as mx
import pytest

from mlxkt.bench import measure
from mlxkt.bench.report import table
from mlxkt.bench.runner import BenchOptions, run_bench
from mlxkt.bench.synth import slice_config, weight_gb, write_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    config = slice_config("tiny", layers=2, experts=8, top_k=2)
    return write_model(tmp_path_factory.mktemp("bench") / "tiny", config, bits=4, seed=1)


def test_slice_config_keeps_routing_valid():
    c = slice_config("dsv3", layers=8, experts=32)
    assert (c["num_hidden_layers"], c["n_routed_experts"], c["num_experts_per_tok"]) == (8, 32, 8)
    assert c["n_routed_experts"] % c["n_group"] == 0
    assert (c["n_routed_experts"] // c["n_group"]) * c["topk_group"] >= c["num_experts_per_tok"]
    c = slice_config("dsv3", layers=2, experts=8)
    assert c["n_routed_experts"] // c["n_group"] >= 2
    with pytest.raises(ValueError):
        slice_config("dsv3", experts=4)


def test_weight_size_scales_with_experts():
    small, big = (weight_gb(slice_config("tiny", layers=2, experts=e)) for e in (8, 16))
    # 4-bit codes + a bf16 scale and bias per 64 weights, plus a bf16 router row and the
    # float32 routing bias
    per_expert = 3 * 256 * 128 * (4 / 8 + 2 * 2 / 64) + 256 * 2 + 4
    assert big - small == pytest.approx(2 * 8 * per_expert / 1e9, rel=1e-6)


def test_both_engines_open_the_same_files(tiny_dir):
    kt = measure.mlxkt_engine(tiny_dir, dtype=mx.float32)
    lm = measure.mlx_lm_engine(tiny_dir, dtype=mx.float32)
    x = mx.array([[5, 9, 13, 40, 41]])
    a, b = kt.model(x), lm.model(x)
    assert mx.allclose(a, b, atol=2e-3, rtol=2e-3).item()
    ab = measure.active_bytes(kt.model)
    assert ab["routed_active"] == pytest.approx(ab["routed_all"] * 2 / 8)


def test_bench_runs_and_reports_ratios(tiny_dir, tmp_path):
    o = BenchOptions(model=str(tiny_dir), prefill=[24], contexts=[40], decode_tokens=4,
                     repeats=1, breakdown_contexts=[40], breakdown_reps=2, out=str(tmp_path))
    result = run_bench(o, log=lambda s: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == result["ratios"]
    for key in ("machine", "copy_gbps", "engines", "ratios", "commit", "command"):
        assert key in saved
    for name in ("mlxkt", "mlx-lm"):
        e = saved["engines"][name]
        assert e["prefill"]["24"]["tok_s"] > 0 and e["decode"]["40"]["ms_per_token"] > 0
        lengths = {e[k]["24"]["prompt_tokens"] for k in ("prefill", "prefill_first_new", "prefill_new")}
        assert len(lengths) == 3  # three lengths: repeated, first new, second new
        assert e["active_gb_per_token"] > 0 and e["graph"]["non_view_nodes"] > 0
        rows = {r["component"] for r in e["breakdown"][0]["rows"]}
        assert {"moe.switch_mlp", "self_attn.o_proj", "lm_head"} <= rows
    assert set(saved["ratios"]["mlxkt / mlx-lm"]) == {"prefill 24", "prefill new 24", "decode 40"}
    assert saved["engines"]["mlxkt"]["prefill_new"]["24"]["tokens"] != saved["engines"]["mlx-lm"]["prefill_new"]["24"]["tokens"]
    assert "mlxkt / mlx-lm" in table(saved) and "24+ new len" in table(saved) and "24+ 1st new len" in table(saved)


def test_breakdown_of_a_compiled_engine_times_its_modules(tiny_dir):
    from mlxkt.bench.breakdown import breakdown
    from mlxkt.layers.decode_compile import set_compiled_decode

    e = measure.mlxkt_engine(tiny_dir, dtype=mx.float32)
    set_compiled_decode(e.model)
    cache = measure.fill_cache(e, 39)
    for _ in range(2):  # prime: later 1-token steps replay the compiled trace
        mx.eval(e.model(mx.array([[3]]), cache=cache))
    b = breakdown(e, 40, reps=2)
    share = {r["component"]: r["share"] for r in b["rows"]}
    # replayed traces would leave the modules ~0 and most of the step unattributed
    assert b["eager_modules"] and share["moe.switch_mlp"] > 0.05 and share["self_attn.o_proj"] > 0.02
    assert share["unattributed (glue, residual adds)"] < 0.5
    assert all(layer.compiled_decode is not None for layer in e.model.layers)  # restored


def test_breakdown_times_stacked_projections_as_the_two_linears(tiny_dir):
    """With MLA's q_a/kv_a stacked (as the loader does on CUDA) the breakdown calls them one
    by one, so each stand-in sees its calls, and leaves them stacked afterwards."""
    from mlxkt.bench.breakdown import breakdown
    from mlxkt.inject import optimize
    from mlxkt.layers.fused_rows import fuse_shared_inputs

    e = measure.mlxkt_engine(tiny_dir, dtype=mx.float32)
    optimize(e.model, rules=(), linears=True)
    assert fuse_shared_inputs(e.model) == len(e.model.layers)
    b = breakdown(e, 40, reps=2)
    share = {r["component"]: r["share"] for r in b["rows"]}
    assert share["self_attn.q_a_proj"] > 0 and share["self_attn.kv_a_proj_with_mqa"] > 0
    assert all("fused_rows" in vars(layer.self_attn) for layer in e.model.layers)


def test_decode_cache_fill_sets_context(tiny_dir):
    e = measure.mlxkt_engine(tiny_dir)
    cache = measure.fill_cache(e, 100)
    assert all(c.offset == 100 for c in cache)
    assert cache[0].keys.shape[-1] == 128 and cache[0].values.shape[-1] == 64


@pytest.mark.parametrize("variant", ["compiled", "eager", "compiled+mla-gemm", "no-segments",
                                     "fused-proj", "compiled+fused-proj", "compiled+no-fold",
                                     "compiled+pad-keys", "compiled+no-mla-prep", "moe-rw4-rb4",
                                     "no-moe-xs", "moe-xs3", "no-fused-rows", "compiled+host-pos",
                                     "compiled+addmm-scores", "compiled+gate-norm"])
def test_variants_decode_like_the_engine(tiny_dir, variant, monkeypatch):
    from mlxkt.bench import variants

    monkeypatch.setenv("MLXKT_SEGMENTS", "1")  # the engine's segmented prefill, on the CPU too
    base = measure.mlxkt_engine(tiny_dir, dtype=mx.float32)
    e = measure.mlxkt_engine(tiny_dir, dtype=mx.float32)
    variants.apply_variant(e, variant)
    assert e.decode_only == (variant != "no-segments")
    prompt = measure.random_prompt(200, base.model.args.vocab_size)  # 199 x top-2 >= 256 pairs
    want = list(base.stream(prompt, base.make_cache(), 6))
    assert list(e.stream(prompt, e.make_cache(), 6)) == want


def test_fused_projections_give_the_same_logits(tiny_dir):
    from mlxkt.bench import variants

    base = measure.mlxkt_engine(tiny_dir, dtype=mx.float32)
    e = measure.mlxkt_engine(tiny_dir, dtype=mx.float32)
    variants.apply_variant(e, "fused-proj")
    for layer in e.model.model.layers:  # the hooks are in place: one linear each
        assert "down_projections" in vars(layer.self_attn)
        assert "gate_up" in vars(layer.mlp.get("shared_experts", layer.mlp))
    x = mx.array([[5, 17, 3, 99, 42]])
    want = base.model(x, cache=base.make_cache())
    got = e.model(x, cache=e.make_cache())
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()


def test_synthetic_model_is_written_by_a_child_and_reused(tmp_path):
    from mlxkt.bench.synth import write_model_in_child

    config = slice_config("tiny", layers=1, experts=4, top_k=2)
    out = write_model_in_child(tmp_path / "m", config, bits=4, group_size=32)
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    stamp = (out / "config.json").stat().st_mtime_ns
    assert write_model_in_child(tmp_path / "m", config, bits=4, group_size=32) == out
    assert (out / "config.json").stat().st_mtime_ns == stamp  # same recipe: not rewritten
    e = measure.mlxkt_engine(out)
    assert e.model.args.n_routed_experts == 4


def test_engine_failing_its_warm_up_is_reported_and_dropped(tiny_dir, tmp_path, monkeypatch):
    real = measure.mlx_lm_engine

    def broken(path, dtype=None):
        e = real(path, dtype)

        def stream(prompt, cache, n):
            raise RuntimeError("simulated kernel failure")
            yield

        e.stream = stream
        return e

    monkeypatch.setattr(measure, "mlx_lm_engine", broken)
    o = BenchOptions(model=str(tiny_dir), prefill=[24], contexts=[40], decode_tokens=4,
                     repeats=1, breakdown_contexts=[], out=str(tmp_path))
    result = run_bench(o, log=lambda s: None)
    assert "simulated kernel failure" in result["engines"]["mlx-lm"]["failed"]
    assert result["engines"]["mlxkt"]["decode"]["40"]["tok_s"] > 0
    text = table(result)
    assert "mlx-lm: FAILED in warm-up" in text and "decode @40 tok/s" in text


def test_breakdown_leaves_a_fused_shared_expert_inside_the_routed_experts(monkeypatch):
    """Where the kernels compute the shared expert, a stand-in for it would take it out of
    their launches; the breakdown then times it within switch_mlp."""
    from mlxkt.bench import breakdown
    from tiny_models import quantized_tiny

    model = quantized_tiny()
    paths = lambda: {p for _, _, p in breakdown._targets(model)}
    assert "mlp.shared_experts" in paths()  # the CPU: no kernels, timed apart
    monkeypatch.setattr(breakdown, "kernel_backend", lambda: "cpu")
    assert "mlp.shared_experts" not in paths() and "mlp.switch_mlp" in paths()
