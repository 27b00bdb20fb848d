"""DeepSeek-V2 / V2.5 / V2-Lite and DeepSeek-V3 / R1 (and Kimi-K2 configs): MLA + MoE.

V2 and V3 differ only in configuration (q LoRA or not, softmax or sigmoid+bias scoring,
routing method), so one implementation serves both; the differences live in the layers.
"""

from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from ..config import ModelArgs
from ..layers.kv_b import split_kv_b
from ..layers.mla import MLAttention
from ..layers.moe import MLP, DeepseekMoE

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def is_moe_layer(args: ModelArgs, idx: int) -> bool:
    return (
        args.n_routed_experts is not None
        and idx >= args.first_k_dense_replace
        and idx % args.moe_layer_freq == 0
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, idx: int):
        super().__init__()
        self.self_attn = MLAttention(args)
        if is_moe_layer(args, idx):
            self.mlp = DeepseekMoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask=None, cache=None):
        fast = getattr(self, "compiled_decode", None)  # set by layers.decode_compile
        y = fast(x, mask, cache) if fast is not None else None
        if y is not None:
            return y
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        if isinstance(self.mlp, DeepseekMoE):  # as compiled decode calls it (same kernels)
            return self.mlp(h, residual=h, norm=self.post_attention_layernorm)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None):
        h = self.embed_tokens(inputs)  # [B, L, D]
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0], return_array=True)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None):
        # inputs: [B, L] -> logits [B, L, vocab]
        return self.lm_head(self.model(inputs, cache))

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        # Per layer: keys = kv latent [B, 1, S, kv_lora_rank], values = k_pe [B, 1, S, rope].
        # With an MTP layer attached, its caches follow the main layers' (see speculative.py).
        caches = [KVCache() for _ in self.layers]
        if "mtp" in self:
            caches += self.mtp.make_cache()
        return caches

    @property
    def cast_predicate(self):
        return lambda k: "e_score_correction_bias" not in k

    def sanitize(self, weights: dict) -> dict:
        """Bring MLX-format variants (mlx-lm, mlx-community, mlxkt) to this module's names."""
        args = self.args
        out = {}
        for k, v in weights.items():
            parts = k.split(".")
            if k.startswith("model.layers.") and int(parts[2]) >= args.num_hidden_layers:
                continue  # MTP layers are loaded separately
            if "rotary_emb.inv_freq" in k:
                continue
            out[k] = v
        for i in range(args.num_hidden_layers):
            _split_kv_b_proj(out, f"model.layers.{i}.self_attn", args)
            _stack_experts(out, f"model.layers.{i}.mlp", args.n_routed_experts)
        return out


def _stack_experts(w: dict, prefix: str, num_experts: Optional[int]):
    """Per-expert MLX tensors (old conversions) -> stacked switch_mlp tensors."""
    for proj in EXPERT_PROJS:
        for kind in ("weight", "scales", "biases"):
            if f"{prefix}.experts.0.{proj}.{kind}" in w:
                parts = [w.pop(f"{prefix}.experts.{e}.{proj}.{kind}") for e in range(num_experts)]
                w[f"{prefix}.switch_mlp.{proj}.{kind}"] = mx.stack(parts)


def _split_kv_b_proj(w: dict, prefix: str, args: ModelArgs):
    """kv_b_proj (dense or quantized) -> embed_q / unembed_out for absorbed attention."""
    key = f"{prefix}.kv_b_proj.weight"
    if key not in w:
        return
    H, nope = args.num_attention_heads, args.qk_nope_head_dim
    weight = w.pop(key)
    scales = w.pop(f"{prefix}.kv_b_proj.scales", None)
    biases = w.pop(f"{prefix}.kv_b_proj.biases", None)
    if scales is None:
        w[f"{prefix}.embed_q.weight"], w[f"{prefix}.unembed_out.weight"] = split_kv_b(weight, H, nope)
        return
    r = args.kv_lora_rank
    quant = dict(bits=weight.shape[-1] * 32 // r, group_size=r // scales.shape[-1])
    # unembed_out's rows are kv_b_proj's rows, quantized along the same axis: slice the packed
    # tensors as they are, with no second rounding.
    for kind, t in (("weight", weight), ("scales", scales), ("biases", biases)):
        w[f"{prefix}.unembed_out.{kind}"] = mx.contiguous(t.reshape(H, -1, t.shape[-1])[:, nope:])
    # embed_q is transposed, so it has to be dequantized and quantized again.
    embed_q, _ = split_kv_b(mx.dequantize(weight, scales, biases, **quant), H, nope)
    if embed_q.shape[-1] % quant["group_size"] == 0:
        embed_q, s, b = mx.quantize(embed_q, **quant)
        w[f"{prefix}.embed_q.scales"], w[f"{prefix}.embed_q.biases"] = s, b
    w[f"{prefix}.embed_q.weight"] = embed_q
