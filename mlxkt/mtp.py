"""DeepSeek-V3's multi-token-prediction (MTP) module, loaded from `mtp.safetensors`.

At position i it combines the main model's final hidden state h_i with the embedding of the
next token t_{i+1} and predicts t_{i+2}:
    x = eh_proj(concat[enorm(embed(t_{i+1})), hnorm(h_i)])   # embedding half first
    x = decoder_block(x)                                       # MLA + MoE, own KV cache
    logits = shared_head.head(shared_head.norm(x))
"""

from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import infer_quant_config

from .loader_utils import cast_floats
from .models.deepseek import DecoderLayer, _split_kv_b_proj, _stack_experts

MTP_FILE = "mtp.safetensors"


class SharedHead(nn.Module):
    def __init__(self, dims: int, vocab: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dims, eps=eps)
        self.head = nn.Linear(dims, vocab, bias=False)


class MTPLayer(DecoderLayer):
    def __init__(self, args, idx: int):
        super().__init__(args, idx)
        D = args.hidden_size
        self.enorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(D, args.vocab_size, args.rms_norm_eps)
        self.embed_tokens = nn.Embedding(args.vocab_size, D)

    def __call__(self, h: mx.array, next_tokens: mx.array, cache=None):
        # h: [B, L, D] main hidden states, next_tokens: [B, L] -> (logits [B, L, V], h' [B, L, D])
        e = self.enorm(self.embed_tokens(next_tokens))
        x = self.eh_proj(mx.concatenate([e, self.hnorm(h)], axis=-1))
        mask = create_attention_mask(x, cache, return_array=True)
        x = super().__call__(x, mask, cache)
        x = self.shared_head.norm(x)
        return self.shared_head.head(x), x


class MTP(nn.Module):
    """The model's MTP layers (DeepSeek-V3 ships one) and their caches."""

    def __init__(self, args, n: int):
        super().__init__()
        self.layers = [MTPLayer(args, args.num_hidden_layers + i) for i in range(n)]

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]


def has_mtp(path: Path) -> bool:
    return (Path(path) / MTP_FILE).exists()


def load_mtp(model: nn.Module, path: Path, dtype: Optional[mx.Dtype] = None) -> Optional[MTP]:
    """Attach `model.mtp` from mtp.safetensors (keys `mtp.{j}.*`); None if there is none."""
    path = Path(path)
    if not has_mtp(path):
        return None
    args = model.args
    weights = mx.load(str(path / MTP_FILE))
    n = 1 + max(int(k.split(".")[1]) for k in weights)
    for j in range(n):
        _split_kv_b_proj(weights, f"mtp.{j}.self_attn", args)
        _stack_experts(weights, f"mtp.{j}.mlp", args.n_routed_experts)
    mtp = MTP(args, n)
    # Embedding and head are often identical to the main model's: the converter may drop them.
    for j, layer in enumerate(mtp.layers):
        if f"mtp.{j}.embed_tokens.weight" not in weights and f"mtp.{j}.embed_tokens.scales" not in weights:
            layer.embed_tokens = model.model.embed_tokens
        if f"mtp.{j}.shared_head.head.weight" not in weights:
            layer.shared_head.head = model.lm_head

    def predicate(p, m):
        full = f"mtp.{p[len('layers.'):]}" if p.startswith("layers.") else p
        if not hasattr(m, "to_quantized") or f"{full}.scales" not in weights:
            return False
        return infer_quant_config(full, m, weights)

    nn.quantize(mtp, class_predicate=predicate)
    mtp.load_weights([(f"layers.{k[len('mtp.'):]}", v) for k, v in weights.items()], strict=False)
    missing = {k for k, _ in tree_flatten(mtp.parameters())} - {
        f"layers.{k[len('mtp.'):]}" for k in weights
    }
    shared = {"embed_tokens", "shared_head.head"}
    missing = {k for k in missing if not any(f".{s}." in k for s in shared)}
    if missing:
        raise ValueError(f"{path / MTP_FILE}: missing tensors, e.g. {sorted(missing)[:3]}")
    if dtype is not None:
        cast_floats(mtp, dtype, model.cast_predicate)
    model.mtp = mtp
    return mtp
