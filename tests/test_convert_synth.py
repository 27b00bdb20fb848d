"""Synthetic Hugging Face-layout checkpoints for the converter tests (own writers, so the
corrupt-input tests can produce any byte layout), plus the mlx-lm reference conversion."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "dsv3-code-tiny"

try:  # a source checkout without `pip install -e .`: find mlxkt.convert in ../convert
    import mlxkt.convert  # noqa: F401
except ImportError:
    import mlxkt

    mlxkt.__path__.append(str(REPO))

torch = pytest.importorskip("torch")

ITEM = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I64": 8, "U8": 1}

DSV3 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 320,
    "hidden_size": 128, "intermediate_size": 192, "moe_intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "n_shared_experts": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
    "topk_group": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 64, "q_lora_rank": 96,
    "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 64, "first_k_dense_replace": 1,
    "max_position_embeddings": 512, "norm_topk_prob": True, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "num_nextn_predict_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1,
    "attention_bias": False, "torch_dtype": "bfloat16",
}
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
              "weight_block_size": [128, 128]}
DSV2 = dict(DSV3, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
            q_lora_rank=None, topk_method="greedy", scoring_func="softmax", n_group=1,
            topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
            num_nextn_predict_layers=0, n_shared_experts=2,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
MIXTRAL = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 320,
    "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
    "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "bos_token_id": 0,
    "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "max_position_embeddings": 512,
}


# ---- raw safetensors ---------------------------------------------------------------------

def raw_header(entries: dict) -> bytes:
    """entries: name -> (dtype, shape, bytes). Returns the whole file's bytes."""
    header, blobs, pos = {}, [], 0
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    return header, b"".join(blobs)


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def write_safetensors(path: Path, entries: dict) -> None:
    Path(path).write_bytes(safetensors_bytes(*raw_header(entries)))


def tensor_entry(t) -> tuple:
    """torch tensor -> (dtype code, shape, bytes)."""
    code = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.float8_e4m3fn: "F8_E4M3"}[t.dtype]
    return code, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes()


def fp8_blocks(w: "torch.Tensor", block=128):
    """float weight [R, C] -> (fp8 weight, float32 scale_inv [ceil(R/b), ceil(C/b)])."""
    R, C = w.shape
    nr, nc = -(-R // block), -(-C // block)
    scale = torch.zeros(nr, nc)
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


# ---- model tensors --------------------------------------------------------------------------

def deepseek_shapes(c: dict) -> dict:
    D, H, V = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    nope, rope, v, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    E, mi = c["n_routed_experts"], c["moe_intermediate_size"]
    s = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    n_mtp = c.get("num_nextn_predict_layers", 0) if c["model_type"] == "deepseek_v3" else 0
    for i in range(c["num_hidden_layers"] + n_mtp):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if c["q_lora_rank"]:
            q = c["q_lora_rank"]
            s.update({a + "q_a_proj.weight": (q, D), a + "q_a_layernorm.weight": (q,),
                      a + "q_b_proj.weight": (H * (nope + rope), q)})
        else:
            s[a + "q_proj.weight"] = (H * (nope + rope), D)
        s.update({a + "kv_a_proj_with_mqa.weight": (r + rope, D), a + "kv_a_layernorm.weight": (r,),
                  a + "kv_b_proj.weight": (H * (nope + v), r), a + "o_proj.weight": (D, H * v)})
        if i < c["first_k_dense_replace"]:
            I = c["intermediate_size"]
            s.update({p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                      p + "mlp.down_proj.weight": (D, I)})
        else:
            s[p + "mlp.gate.weight"] = (E, D)
            if c["topk_method"] == "noaux_tc":
                s[p + "mlp.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                s.update({f"{p}mlp.experts.{e}.gate_proj.weight": (mi, D),
                          f"{p}mlp.experts.{e}.up_proj.weight": (mi, D),
                          f"{p}mlp.experts.{e}.down_proj.weight": (D, mi)})
            si = mi * c["n_shared_experts"]
            s.update({p + "mlp.shared_experts.gate_proj.weight": (si, D),
                      p + "mlp.shared_experts.up_proj.weight": (si, D),
                      p + "mlp.shared_experts.down_proj.weight": (D, si)})
        if i >= c["num_hidden_layers"]:
            s.update({p + "enorm.weight": (D,), p + "hnorm.weight": (D,), p + "eh_proj.weight": (D, 2 * D),
                      p + "shared_head.norm.weight": (D,), p + "shared_head.head.weight": (V, D),
                      p + "embed_tokens.weight": (V, D)})
    return s


def mixtral_shapes(c: dict) -> dict:
    D, V, I, E = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_local_experts"]
    hd = D // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    s = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                  p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv, D),
                  p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, D),
                  p + "block_sparse_moe.gate.weight": (E, D)})
        for e in range(E):
            s.update({f"{p}block_sparse_moe.experts.{e}.w1.weight": (I, D),
                      f"{p}block_sparse_moe.experts.{e}.w2.weight": (D, I),
                      f"{p}block_sparse_moe.experts.{e}.w3.weight": (I, D)})
    return s


def make_tensors(config: dict, fp8: bool = False, seed: int = 0) -> dict:
    """name -> torch tensor, in the release layout (FP8 `*_proj.weight` but eh_proj)."""
    shapes = mixtral_shapes(config) if config["model_type"] == "mixtral" else deepseek_shapes(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = 0.1 * torch.randn(shape, generator=g)
            continue
        if len(shape) == 1:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) * shape[-1] ** -0.5
        if fp8 and name.endswith("_proj.weight") and "eh_proj" not in name:
            q, s = fp8_blocks(w)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }))


def write_checkpoint(path: Path, config: dict, tensors: dict, n_shards: int = 2) -> Path:
    """Release layout: config, sharded safetensors + index, tokenizer, generation config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if any(t.dtype == torch.float8_e4m3fn for t in tensors.values()):
        config["quantization_config"] = FP8_CONFIG
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    write_tokenizer(path, config["vocab_size"])
    names = list(tensors)
    per = math.ceil(len(names) / n_shards)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        write_safetensors(path / fname, {n: tensor_entry(tensors[n]) for n in part})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=1))
    return path


def build(path: Path, kind: str = "dsv3", fp8: bool = True, seed: int = 0, **overrides) -> Path:
    config = dict({"dsv3": DSV3, "dsv2": DSV2, "mixtral": MIXTRAL}[kind], **overrides)
    return write_checkpoint(path, config, make_tensors(config, fp8=fp8, seed=seed))


def strip_mtp(src: Path, dst: Path) -> Path:
    """A copy without layers >= num_hidden_layers, for mlx-lm (which drops only layer 61)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    N = config["num_hidden_layers"]
    weight_map = {}
    for f in sorted(src.glob("model*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        entries = {}
        for k, v in header.items():
            if k.startswith("model.layers.") and int(k.split(".")[2]) >= N:
                continue
            b0, b1 = v["data_offsets"]
            entries[k] = (v["dtype"], v["shape"], raw[8 + n + b0:8 + n + b1])
        write_safetensors(dst / f.name, entries)
        weight_map.update({k: f.name for k in entries})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    return dst


def mlx_lm_reference(src: Path, tmp: Path, bits=4, group_size=64, quantize=True,
                     dtype="bfloat16", skip=lambda path: False):
    """mlx-lm's own conversion of `src` (MTP layers stripped), in memory: the model."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(strip_mtp(src, tmp / "mlx_lm_src"), lazy=True)
    dt = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda k: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(dt) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))
    if quantize:
        model, _ = quantize_model(model, config, group_size, bits,
                                  quant_predicate=lambda p, m: not skip(p))
    return model


TOKENS = [[0, 5, 100, 200, 7, 9, 11, 300, 42, 1]]


def logits(model):
    """Logits in float32 (weights upcast losslessly: MLX's CPU gather_mm needs float32)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(
        lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
        model.parameters()))
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def test_fp8_blocks_round_trip():
    w = torch.randn(200, 300)
    q, s = fp8_blocks(w)
    assert s.shape == (2, 3)
    back = q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert torch.allclose(back, w, atol=0.1, rtol=0.07)


def test_checkpoint_layout(tmp_path):
    src = build(tmp_path / "src", "dsv3", fp8=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.2.eh_proj.weight" in index  # MTP layer at num_hidden_layers
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in index
    assert len(set(index.values())) == 2
