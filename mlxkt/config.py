"""Model configuration: one dataclass that reads both config.json styles.

DeepSeek releases `rope_theta` + `rope_scaling`; transformers 5 saves `rope_parameters`.
Everything is normalised here so that the models read one form.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

# model_type aliases: configs that share an implementation.
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 0
    num_key_value_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # MLA (DeepSeek)
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # MoE (DeepSeek)
    moe_intermediate_size: int = 0
    n_routed_experts: Optional[int] = None
    n_shared_experts: Optional[int] = None
    num_experts_per_tok: int = 1
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    # Mixtral
    num_local_experts: Optional[int] = None
    head_dim: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        config = normalize_config(config)
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in config.items() if k in names and k != "extra"}
        extra = {k: v for k, v in config.items() if k not in names}
        args = cls(**known, extra=extra)
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        if args.head_dim is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        return args


def normalize_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Return a copy in the released style: model_type resolved, rope_theta/rope_scaling."""
    config = dict(config)
    if "text_config" in config and "hidden_size" not in config:
        config.update(config["text_config"])
    mt = config.get("model_type")
    config["model_type"] = MODEL_TYPE_ALIASES.get(mt, mt)

    rp = config.pop("rope_parameters", None)
    if rp:
        rp = dict(rp)
        if "rope_theta" in rp:
            config.setdefault("rope_theta", rp["rope_theta"])
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = rp
    rs = config.get("rope_scaling")
    if rs:
        rs = dict(rs)
        rs.setdefault("type", rs.get("rope_type", "default"))
        rs.setdefault("rope_type", rs["type"])
        if rs["type"] == "default":
            rs = None
        config["rope_scaling"] = rs
    return config
