"""Converter core: outputs that mlx-lm loads unchanged and that give the logits of mlx-lm's own
conversion of the same source; MTP file; recipes; sharding; round trip."""

import json

import mlx.core as mx
import numpy as np
import pytest
from test_convert_synth import FIXTURE, build, logits, mlx_lm_reference

from mlxkt.convert import convert


def load_mlx_lm(path):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    assert tokenizer.encode("t5 t7", add_special_tokens=False) or True
    return model


def assert_same_logits(a, b, tol=1e-3):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= tol * scale, (np.abs(a - b).max(), scale)


def read_all(path):
    out = {}
    for f in sorted(path.glob("model-*.safetensors")):
        out.update(mx.load(str(f)))
    return out


@pytest.mark.parametrize("kind,fp8", [("dsv3", True), ("dsv3", False), ("dsv2", False), ("mixtral", False)])
def test_matches_mlx_lm_conversion(tmp_path, kind, fp8):
    src = build(tmp_path / "src", kind, fp8=fp8)
    dst = convert(src, tmp_path / "out", progress=False)
    ours = load_mlx_lm(dst)
    # Routers stay unquantized in mlxkt's conversions (Mixtral's gate is an nn.Linear that
    # mlx-lm would quantize by default).
    ref = mlx_lm_reference(src, tmp_path, skip=lambda p: p.endswith("block_sparse_moe.gate"))
    assert_same_logits(logits(ours), logits(ref))


@pytest.mark.parametrize("variant", ["fp8", "bf16"])
def test_fixture_matches_mlx_lm(tmp_path, variant):
    src = FIXTURE / variant
    if not src.is_dir():
        pytest.skip("shared fixture dsv3-code-tiny absent")
    dst = convert(src, tmp_path / "out", progress=False)
    assert_same_logits(logits(load_mlx_lm(dst)), logits(mlx_lm_reference(src, tmp_path)))


def test_dsv3_layout_and_config(tmp_path):
    # moe_intermediate 96: routed down_proj input not divisible by 64 (and ragged FP8 blocks)
    src = build(tmp_path / "src", "dsv3", fp8=True, moe_intermediate_size=96)
    dst = convert(src, tmp_path / "out", progress=False)
    w = read_all(dst)
    E, mi, D = 4, 96, 128
    assert w["model.layers.1.mlp.switch_mlp.gate_proj.weight"].shape == (E, mi, D * 4 // 32)
    assert w["model.layers.1.mlp.switch_mlp.gate_proj.scales"].shape == (E, mi, D // 64)
    assert w["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert w["model.layers.1.mlp.gate.weight"].dtype == mx.bfloat16
    assert "model.layers.0.self_attn.kv_b_proj.weight" not in w
    assert w["model.layers.0.self_attn.embed_q.weight"].shape == (2, 64, 64 * 4 // 32)
    assert not any(".experts." in k for k in w)
    config = json.loads((dst / "config.json").read_text())
    q = config["quantization"]
    assert q["group_size"] == 64 and q["bits"] == 4
    assert q["model.layers.0.self_attn.q_b_proj"] is False  # q_lora_rank 96 % 64 != 0
    assert q["model.layers.1.mlp.switch_mlp.down_proj"] is False
    assert w["model.layers.1.mlp.switch_mlp.down_proj.weight"].shape == (E, D, mi)
    assert config["quantization_config"] == q
    assert config["mlxkt"]["format_version"] == 1 and config["mlxkt"]["bits_per_weight"] > 4
    assert "quant_method" not in json.dumps(config)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(w)


def test_mtp_file(tmp_path):
    src = build(tmp_path / "src", "dsv3", fp8=True)
    dst = convert(src, tmp_path / "out", progress=False)
    mtp = mx.load(str(dst / "mtp.safetensors"))
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
              "self_attn.embed_q.weight", "self_attn.unembed_out.scales",
              "mlp.switch_mlp.up_proj.weight", "mlp.shared_experts.gate_proj.scales",
              "mlp.gate.e_score_correction_bias"):
        assert f"mtp.0.{k}" in mtp, k
    assert all(k.startswith("mtp.0.") for k in mtp)
    main = read_all(dst)
    assert not any(k.startswith("model.layers.2.") for k in main)
    # The MTP head is quantized like the main head.
    assert mtp["mtp.0.shared_head.head.weight"].dtype == mx.uint32


def test_no_quantize_dtype(tmp_path):
    src = build(tmp_path / "src", "dsv3", fp8=True)
    dst = convert(src, tmp_path / "bf16", quantize=False, progress=False)
    ref = mlx_lm_reference(src, tmp_path, quantize=False)
    assert_same_logits(logits(load_mlx_lm(dst)), logits(ref), tol=1e-5)
    # float32 keeps the exact FP8 * scale products (mlx-lm rounds its FP8 dequant to bf16).
    dst32 = convert(src, tmp_path / "f32", quantize=False, dtype="float32", progress=False)
    config = json.loads((dst32 / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    w = read_all(dst32)
    assert all(v.dtype == mx.float32 for v in w.values())
    assert_same_logits(logits(load_mlx_lm(dst32)), logits(ref), tol=2e-2)


def test_recipe_deepseek_mixed(tmp_path, capsys):
    src = build(tmp_path / "src", "dsv3", fp8=True)
    dst = convert(src, tmp_path / "out", recipe="deepseek-mixed", progress=True)
    out = capsys.readouterr().out
    assert "bits per weight" in out and "GB" in out
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["bits"] == 4
    assert "model.layers.1.mlp.switch_mlp.gate_proj" not in q  # default bits
    assert q["model.layers.0.self_attn.o_proj"] == {"group_size": 64, "bits": 8}
    assert q["model.layers.1.mlp.shared_experts.down_proj"] == {"group_size": 64, "bits": 8}
    assert q["model.layers.0.mlp.up_proj"] == {"group_size": 64, "bits": 8}
    assert q["model.embed_tokens"] == {"group_size": 64, "bits": 6}
    assert q["lm_head"] == {"group_size": 64, "bits": 6}
    assert q["model.layers.1.mlp.gate"] is False
    w = read_all(dst)
    assert w["model.layers.0.self_attn.o_proj.weight"].shape == (128, 64 * 8 // 32)
    assert w["model.embed_tokens.weight"].shape == (320, 128 * 6 // 32)

    ref = mlx_lm_reference(src, tmp_path)
    ours = load_mlx_lm(dst)  # mlx-lm honours the per-module overrides
    assert ours.model.layers[0].self_attn.o_proj.bits == 8
    assert ours.model.embed_tokens.bits == 6
    # Mostly more bits than uniform 4-bit: closer to the unquantized model.
    full = mlx_lm_reference(src, tmp_path / "f", quantize=False)
    err_mixed = np.abs(logits(ours) - logits(full)).mean()
    err_4 = np.abs(logits(ref) - logits(full)).mean()
    assert err_mixed < err_4


def test_round_trip_within_quantization_tolerance(tmp_path):
    src = build(tmp_path / "src", "dsv3", fp8=False)
    from safetensors.torch import load_file as load_torch

    source = {}
    for f in src.glob("model-*.safetensors"):
        source.update(load_torch(f))
    for bits, tol in ((8, 0.01), (4, 0.15), (2, 0.6)):
        dst = convert(src, tmp_path / f"out{bits}", bits=bits, progress=False)
        w = read_all(dst)
        for e in range(4):
            ref = source[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].float().numpy()
            p = "model.layers.1.mlp.switch_mlp.down_proj"
            back = mx.dequantize(w[p + ".weight"][e], w[p + ".scales"][e], w[p + ".biases"][e],
                                 group_size=64, bits=bits)
            rel = np.abs(np.array(back.astype(mx.float32)) - ref).mean() / np.abs(ref).mean()
            assert rel < tol, (bits, rel)


def test_small_shards(tmp_path):
    src = build(tmp_path / "src", "dsv3", fp8=True)
    dst = convert(src, tmp_path / "out", max_shard_bytes=50_000, progress=False)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:
        names = set(mx.load(str(s)))
        assert {k for k, v in index["weight_map"].items() if v == s.name} == names
        # A shard's tensor data is over the limit only when one module alone is.
        data = s.stat().st_size - 8 - int.from_bytes(s.read_bytes()[:8], "little")
        if data > 50_000:
            assert len({n.rsplit(".", 1)[0] for n in names}) <= 2
    ref = convert(src, tmp_path / "one", progress=False)
    assert_same_logits(logits(load_mlx_lm(dst)), logits(load_mlx_lm(ref)), tol=0)


def test_kv_b_split_matches_loader(tmp_path):
    """The conversion's split equals mlxkt's loader split of the unsplit kv_b_proj."""
    from mlxkt.layers.kv_b import split_kv_b

    src = build(tmp_path / "src", "dsv3", fp8=False)
    dst = convert(src, tmp_path / "out", quantize=False, progress=False)
    from safetensors.torch import load_file as load_torch

    source = {}
    for f in src.glob("model-*.safetensors"):
        source.update(load_torch(f))
    kv_b = mx.array(source["model.layers.0.self_attn.kv_b_proj.weight"].float().numpy())
    eq, uo = split_kv_b(kv_b.astype(mx.bfloat16), 2, 64)
    w = read_all(dst)
    assert mx.array_equal(w["model.layers.0.self_attn.embed_q.weight"], eq).item()
    assert mx.array_equal(w["model.layers.0.self_attn.unembed_out.weight"], uo).item()


def test_kimi_k2_alias(tmp_path):
    src = build(tmp_path / "src", "dsv3", fp8=True, model_type="kimi_k2")
    dst = convert(src, tmp_path / "out", progress=False)
    assert json.loads((dst / "config.json").read_text())["model_type"] == "kimi_k2"
    assert "model.layers.0.self_attn.embed_q.weight" in read_all(dst)
    load_mlx_lm(dst)  # mlx-lm maps kimi_k2 to its deepseek_v3 model


def test_single_file_source_without_index(tmp_path):
    from test_convert_synth import MIXTRAL, make_tensors, write_checkpoint

    src = write_checkpoint(tmp_path / "src", MIXTRAL, make_tensors(MIXTRAL), n_shards=1)
    (src / "model.safetensors.index.json").unlink()
    (src / "model-00001-of-00001.safetensors").rename(src / "model.safetensors")
    dst = convert(src, tmp_path / "out", progress=False)
    assert "model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight" in read_all(dst)
    load_mlx_lm(dst)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (5, 128), (6, 32), (8, 128)])
def test_bits_and_group_sizes_match_mlx_lm(tmp_path, bits, group_size):
    src = build(tmp_path / "src", "dsv3", fp8=True)
    dst = convert(src, tmp_path / "out", bits=bits, group_size=group_size, progress=False)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (bits, group_size)
    ref = mlx_lm_reference(src, tmp_path, bits=bits, group_size=group_size)
    assert_same_logits(logits(load_mlx_lm(dst)), logits(ref))


def test_remote_code_files_are_not_copied(tmp_path):
    src = build(tmp_path / "src", "dsv3", fp8=True)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "modeling_deepseek.py").write_text("raise SystemExit('must never run')\n")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    dst = convert(src, tmp_path / "out", progress=False)
    assert not list(dst.glob("*.py"))
    assert (dst / "chat_template.jinja").exists()
