"""Synthetic DeepSeek-V3 slices at real widths, written as a converted MLX directory.

The weights are random but laid out exactly like a `mlxkt convert` output (uniform recipe),
so `mlxkt.load` and `mlx_lm.load` open the same files. A slice keeps the real per-layer
widths (H=7168, I=2048, 128 heads, kv_lora 512) with fewer layers and fewer routed
experts; with the same top-k it reads the same active bytes per MoE layer per token.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# DeepSeek-V3 / R1's released config (the parts that shape compute).
DSV3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "num_nextn_predict_layers": 0, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "attention_bias": False, "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
}

# A tiny model of the same structure, for CPU smoke runs and tests.
TINY = dict(DSV3, vocab_size=320, hidden_size=256, intermediate_size=512,
            moe_intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=128, q_lora_rank=192)

PRESETS = {"dsv3": DSV3, "tiny": TINY}


def slice_config(preset: str = "dsv3", layers: int = 8, experts: int = 32,
                 top_k: Optional[int] = None, dense_layers: int = 0,
                 vocab: Optional[int] = None) -> dict:
    """A config with `layers` layers, the first `dense_layers` dense, `experts` routed
    experts (group-limited routing keeps its shape: n_group shrinks when it must)."""
    c = dict(PRESETS[preset])
    c.update(num_hidden_layers=layers, n_routed_experts=experts,
             first_k_dense_replace=dense_layers)
    if top_k is not None:
        c["num_experts_per_tok"] = top_k
    if vocab is not None:
        c["vocab_size"] = vocab
    k = c["num_experts_per_tok"]
    if k > experts:
        raise ValueError(f"top-{k} routing needs at least {k} experts, not {experts}")
    n_group = c["n_group"]
    # Each group must hold >= 2 experts (noaux_tc scores a group by its top 2) and the
    # kept groups enough experts for top-k.
    while n_group > 1 and (experts % n_group or experts // n_group < 2
                           or (experts // n_group) * c["topk_group"] < k):
        n_group //= 2
    c["n_group"] = n_group
    c["topk_group"] = min(c["topk_group"], n_group)
    return c


def build_model(config: dict, bits: int = 4, group_size: int = 64, seed: int = 0):
    """The mlxkt model for `config`, quantized like `mlxkt convert` (uniform recipe), with
    random weights. Parameters are evaluated module by module to bound memory."""
    model = shapes_model(config, bits, group_size)
    by_module = {}
    for n, a in tree_flatten(model.parameters()):
        by_module.setdefault(n.rsplit(".", 1)[0], []).append((n, a))
    new = {}
    for i, (prefix, group) in enumerate(by_module.items()):
        keys = mx.random.split(mx.random.key(seed * 100003 + i), len(group))
        for j, (n, a) in enumerate(group):
            new[n] = _fill_param(n, a, bits, group_size, keys[j])
        scales = new.get(prefix + ".scales")
        if scales is not None:  # centre the codes: w = s * (q - (2^b - 1) / 2)
            new[prefix + ".biases"] = (-(2**bits - 1) / 2 * scales).astype(scales.dtype)
        mx.eval([new[n] for n, _ in group])
    model.update(tree_unflatten(list(new.items())))
    return model


def shapes_model(config: dict, bits: int = 4, group_size: int = 64):
    """The quantized mlxkt model with lazy (never evaluated) parameters: shapes and dtypes."""
    from ..config import ModelArgs
    from ..loader_utils import cast_floats
    from ..models import get_model_classes

    model_cls, _ = get_model_classes(config)
    model = model_cls(ModelArgs.from_dict(config))
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % group_size == 0)
    cast_floats(model, mx.bfloat16, lambda k: "e_score_correction_bias" not in k)
    return model


def _fill_param(name, a, bits, group_size, key):
    k1, k2 = mx.random.split(key)
    if name.endswith(".weight") and a.dtype == mx.uint32:
        # packed quantized codes, uniform over all bit patterns
        return mx.random.randint(-(2**31), 2**31 - 1, a.shape, key=k1).view(mx.uint32)
    if name.endswith(".scales"):
        in_dim = a.shape[-1] * group_size
        s = in_dim**-0.5 / ((2**bits - 1) / 12**0.5)  # codes are uniform: std (2^b-1)/sqrt(12)
        return (s * mx.random.uniform(0.8, 1.2, a.shape, key=k1)).astype(a.dtype)
    if name.endswith(".biases"):
        return a  # replaced from the scales by the caller
    if name.endswith("e_score_correction_bias"):
        return (0.01 * mx.random.normal(a.shape, key=k1)).astype(mx.float32)
    if "norm" in name:
        return mx.ones(a.shape, a.dtype)
    if "embed_tokens" in name:
        return mx.random.normal(a.shape, key=k2).astype(a.dtype)
    return (a.shape[-1] ** -0.5 * mx.random.normal(a.shape, key=k2)).astype(a.dtype)


def write_model(out: Path, config: dict, bits: int = 4, group_size: int = 64,
                seed: int = 0) -> Path:
    """Build the random model and save it as a converted MLX directory."""
    from mlx_lm.utils import save_model

    from ..demo import write_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(config, bits, group_size, seed)
    save_model(out, model, donate_model=True)
    del model
    config = dict(config)
    if bits:
        config["quantization"] = {"group_size": group_size, "bits": bits}
        config["quantization_config"] = dict(config["quantization"])
    config["mlxkt"] = {"format_version": 1, "source": "synthetic (mlxkt.bench.synth)",
                       "recipe": "uniform", "bits_per_weight": None}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(out)
    return out


def write_model_in_child(out: Path, config: dict, bits: int = 4, group_size: int = 64) -> Path:
    """write_model in a child process, reusing a directory written with the same recipe.

    On MLX CUDA (0.32.4), a process that builds and saves the model and then loads it back
    later dies in its first decode with "cudaGraphAddKernelNode ... illegal memory access";
    loading in a process that did not write the files runs cleanly (benchmarks/RESULTS.md)."""
    out = Path(out)
    recipe = json.dumps({"config": config, "bits": bits, "group_size": group_size}, sort_keys=True)
    stamp = out / "mlxkt-synth-recipe.json"
    if stamp.exists() and stamp.read_text() == recipe:
        return out
    code = ("import json, sys; from mlxkt.bench.synth import write_model; "
            "r = json.loads(sys.argv[2]); write_model(sys.argv[1], r['config'], r['bits'], r['group_size'])")
    subprocess.run([sys.executable, "-c", code, str(out), recipe], check=True)
    stamp.write_text(recipe)
    return out


def weight_gb(config: dict, bits: int = 4, group_size: int = 64) -> float:
    """Size of the quantized slice in GB (1e9 bytes), from the shapes alone."""
    model = shapes_model(config, bits, group_size)
    return sum(a.nbytes for _, a in tree_flatten(model.parameters())) / 1e9
