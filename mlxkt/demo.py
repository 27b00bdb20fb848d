"""`mlxkt demo`: the user's path end to end on a tiny random DeepSeek-V3, offline.

Writes a checkpoint in DeepSeek's released layout (FP8 e4m3 weights with 128x128
`weight_scale_inv` blocks, per-expert tensors, two shards with an index, an MTP layer),
converts it to 4-bit with `mlxkt convert`, loads it and generates. The weights are random,
so the text is noise; the point is the pipeline and the speed.
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 320,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 128,
    "q_lora_rank": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
}
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def release_tensors(config: dict, rng: np.random.Generator) -> dict:
    """name -> float32 array, with DeepSeek's released names (per-expert, unsplit kv_b)."""
    c = config
    D, H = c["hidden_size"], c["num_attention_heads"]
    qh = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    t = {}

    def lin(name, out_dim, in_dim):
        t[name] = rng.normal(0, in_dim**-0.5, (out_dim, in_dim)).astype(np.float32)

    def norm(name, dim):
        t[name] = (1 + 0.1 * rng.normal(size=dim)).astype(np.float32)

    def block(p, moe):
        norm(f"{p}.input_layernorm.weight", D)
        norm(f"{p}.post_attention_layernorm.weight", D)
        a = f"{p}.self_attn"
        lin(f"{a}.q_a_proj.weight", c["q_lora_rank"], D)
        norm(f"{a}.q_a_layernorm.weight", c["q_lora_rank"])
        lin(f"{a}.q_b_proj.weight", H * qh, c["q_lora_rank"])
        lin(f"{a}.kv_a_proj_with_mqa.weight", c["kv_lora_rank"] + c["qk_rope_head_dim"], D)
        norm(f"{a}.kv_a_layernorm.weight", c["kv_lora_rank"])
        lin(f"{a}.kv_b_proj.weight", H * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        lin(f"{a}.o_proj.weight", D, H * c["v_head_dim"])
        if not moe:
            for n, (o, i) in {"gate_proj": (c["intermediate_size"], D), "up_proj": (c["intermediate_size"], D),
                              "down_proj": (D, c["intermediate_size"])}.items():
                lin(f"{p}.mlp.{n}.weight", o, i)
            return
        I, E = c["moe_intermediate_size"], c["n_routed_experts"]
        lin(f"{p}.mlp.gate.weight", E, D)
        t[f"{p}.mlp.gate.e_score_correction_bias"] = (0.1 * rng.normal(size=E)).astype(np.float32)
        for e in [str(i) for i in range(E)] + ["shared"]:
            q = f"{p}.mlp.experts.{e}" if e != "shared" else f"{p}.mlp.shared_experts"
            lin(f"{q}.gate_proj.weight", I, D)
            lin(f"{q}.up_proj.weight", I, D)
            lin(f"{q}.down_proj.weight", D, I)

    t["model.embed_tokens.weight"] = rng.normal(0, 1, (c["vocab_size"], D)).astype(np.float32)
    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        block(f"model.layers.{i}", i >= c["first_k_dense_replace"])
    norm("model.norm.weight", D)
    lin("lm_head.weight", c["vocab_size"], D)
    for i in range(c["num_hidden_layers"], c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}"
        norm(f"{p}.enorm.weight", D)
        norm(f"{p}.hnorm.weight", D)
        lin(f"{p}.eh_proj.weight", D, 2 * D)
        norm(f"{p}.shared_head.norm.weight", D)
        t[f"{p}.shared_head.head.weight"] = t["lm_head.weight"]
        t[f"{p}.embed_tokens.weight"] = t["model.embed_tokens.weight"]
    return t


def fp8_blocks(w: np.ndarray, block: int = 128):
    """float32 [out, in] -> (e4m3 bytes [out, in], scale_inv [ceil(out/128), ceil(in/128)])."""
    import mlx.core as mx

    o, i = w.shape
    bo, bi = -(-o // block), -(-i // block)
    padded = np.zeros((bo * block, bi * block), np.float32)
    padded[:o, :i] = w
    blocks = padded.reshape(bo, block, bi, block)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0  # e4m3's max
    q = (blocks / scale[:, None, :, None]).reshape(bo * block, bi * block)[:o, :i]
    return np.array(mx.to_fp8(mx.array(q))), scale.astype(np.float32)


def write_safetensors(path: Path, tensors: dict) -> None:
    """Minimal writer; tensors: name -> (safetensors dtype, numpy array)."""
    header, offset, chunks = {}, 0, []
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for c in chunks:
            f.write(c)


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }, indent=1))


def write_release_checkpoint(out: Path, seed: int = 0) -> Path:
    """The tiny model in DeepSeek-V3's released FP8 layout, two shards plus an index."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = release_tensors(DEMO_CONFIG, rng)
    stored = {}
    for name, w in tensors.items():
        if name.endswith("_proj.weight") and "eh_proj" not in name and ".gate." not in name:
            q, s = fp8_blocks(w)
            stored[name] = ("F8_E4M3", q)
            stored[name + "_scale_inv"] = ("F32", s)
        elif "e_score_correction_bias" in name:
            stored[name] = ("F32", w)
        else:
            import mlx.core as mx  # bf16 bytes via MLX: numpy has no bfloat16

            stored[name] = ("BF16", np.array(mx.array(w).astype(mx.bfloat16).view(mx.uint16)))
    names = list(stored)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, part in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, {n: stored[n] for n in part})
        weight_map.update({n: fname for n in part})
    total = sum(a.nbytes for _, a in stored.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    write_tokenizer(out)
    return out


def run_demo(workdir=None, max_tokens: int = 32) -> None:
    import mlx.core as mx

    from .convert import convert
    from .generate import print_stats, stream_generate
    from .loader import load

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mlxkt-demo-")
        workdir = tmp.name
    root = Path(workdir)
    print(f"[1/3] writing a tiny random DeepSeek-V3 in the released FP8 layout: {root / 'hf'}")
    src = write_release_checkpoint(root / "hf")
    print(f"[2/3] mlxkt convert {src} {root / 'mlx-4bit'} --bits 4")
    t0 = time.perf_counter()
    dst = convert(src, root / "mlx-4bit", bits=4, group_size=64, force=True)
    print(f"      converted in {time.perf_counter() - t0:.2f} s")
    print(f"[3/3] generating {max_tokens} tokens on {mx.default_device()} (random weights: noise)")
    model, tokenizer = load(dst)
    last = None
    for r in stream_generate(model, tokenizer, "Hello, mlxkt!", max_tokens=max_tokens):
        print(r.text, end="", flush=True)
        last = r
    print()
    print_stats(last)
    print("demo ok")
    if tmp is not None:
        tmp.cleanup()
