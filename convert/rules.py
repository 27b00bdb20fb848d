"""Per-model name tables: source tensor name -> MLX output name, kind and recipe role.

A layer tensor `model.layers.{i}.{rest}` is matched on `rest` by `layer` rules (and, for MTP
layers `i >= num_hidden_layers`, also by `mtp` rules); other tensors by `top` rules. Kinds:
  param      copied (cast), never quantized          linear/embedding  quantizable module
  expert     one slot of a stacked switch tensor     kv_b              split into embed_q /
  skip       dropped                                                    unembed_out (absorbed MLA)
"""

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .errors import ConvertError


@dataclass(frozen=True)
class Rule:
    pattern: str  # full-match regex; named group `e` = expert index
    out: Optional[str]  # output name (str.format over the named groups, after `rename`)
    kind: str
    role: str = ""
    rename: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRules:
    top: Tuple[Rule, ...]
    layer: Tuple[Rule, ...]
    mtp: Tuple[Rule, ...] = ()
    num_experts_key: str = "n_routed_experts"
    required: Tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")


P = "(?P<p>gate_proj|up_proj|down_proj)"
SKIP = Rule(r".*rotary_emb\.inv_freq", None, "skip")
NORMS = Rule(r"(?P<n>input_layernorm|post_attention_layernorm)\.weight", "{n}.weight", "param", "norm")
TOP = (
    Rule(r"model\.embed_tokens\.weight", "model.embed_tokens.weight", "embedding", "embed"),
    Rule(r"model\.norm\.weight", "model.norm.weight", "param", "norm"),
    Rule(r"lm_head\.weight", "lm_head.weight", "linear", "head"),
    SKIP,
)


def _deepseek(kv_b_kind: str) -> ModelRules:
    A = "self_attn"
    return ModelRules(
        top=TOP,
        layer=(
            NORMS,
            Rule(rf"{A}\.(?P<n>q_a_layernorm|kv_a_layernorm)\.weight", A + ".{n}.weight", "param", "norm"),
            Rule(rf"{A}\.(?P<n>q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)\.weight",
                 A + ".{n}.weight", "linear", "attn"),
            Rule(rf"{A}\.(?P<n>q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)\.bias",
                 A + ".{n}.bias", "param", "bias"),
            Rule(rf"{A}\.kv_b_proj\.weight", A + ".kv_b_proj.weight", kv_b_kind, "attn"),
            Rule(rf"mlp\.{P}\.weight", "mlp.{p}.weight", "linear", "dense_mlp"),
            Rule(rf"mlp\.shared_experts\.{P}\.weight", "mlp.shared_experts.{p}.weight", "linear",
                 "shared_expert"),
            Rule(rf"mlp\.experts\.(?P<e>\d+)\.{P}\.weight", "mlp.switch_mlp.{p}.weight", "expert",
                 "routed_expert"),
            Rule(r"mlp\.gate\.weight", "mlp.gate.weight", "param", "router"),
            Rule(r"mlp\.gate\.e_score_correction_bias", "mlp.gate.e_score_correction_bias", "param",
                 "router_bias"),
            SKIP,
        ),
        mtp=(
            Rule(r"(?P<n>enorm|hnorm|shared_head\.norm)\.weight", "{n}.weight", "param", "norm"),
            Rule(r"eh_proj\.weight", "eh_proj.weight", "linear", "mtp_proj"),
            Rule(r"shared_head\.head\.weight", "shared_head.head.weight", "linear", "head"),
            Rule(r"embed_tokens\.weight", "embed_tokens.weight", "embedding", "embed"),
        ),
    )


MIXTRAL = ModelRules(
    top=TOP,
    layer=(
        NORMS,
        Rule(r"self_attn\.(?P<n>q_proj|k_proj|v_proj|o_proj)\.weight", "self_attn.{n}.weight",
             "linear", "attn"),
        Rule(r"block_sparse_moe\.gate\.weight", "block_sparse_moe.gate.weight", "param", "router"),
        Rule(r"block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<p>w1|w2|w3)\.weight",
             "block_sparse_moe.switch_mlp.{p}.weight", "expert", "routed_expert",
             rename={"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}),
        SKIP,
    ),
    num_experts_key="num_local_experts",
)

MODEL_RULES = {
    "deepseek_v3": _deepseek("kv_b"),  # absorbed MLA: kv_b_proj split at conversion
    "kimi_k2": _deepseek("kv_b"),
    "deepseek_v2": _deepseek("linear"),  # mlx-lm's deepseek_v2 expects kv_b_proj itself
    "mixtral": MIXTRAL,
}


@dataclass(frozen=True)
class Match:
    out: str  # output tensor name (main: model.layers.i..., MTP: mtp.j...)
    kind: str
    role: str
    mtp: bool = False
    layer: Optional[int] = None
    expert: Optional[int] = None


LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _apply(rules, name: str) -> Optional[Tuple[Rule, dict]]:
    for r in rules:
        m = re.fullmatch(r.pattern, name)
        if m:
            groups = {k: r.rename.get(v, v) for k, v in m.groupdict().items()}
            return r, groups
    return None


def match(rules: ModelRules, config: dict, name: str, file) -> Match:
    """Map one source tensor name; unknown names are an error naming the file and tensor."""
    n_layers = config["num_hidden_layers"]
    n_mtp = config.get("num_nextn_predict_layers", 0) if rules.mtp else 0
    m = LAYER_RE.fullmatch(name)
    if m is None:
        hit = _apply(rules.top, name)
        if hit is None:
            raise ConvertError(f"{file}: tensor {name}: unexpected name for this model type")
        r, g = hit
        return Match(r.out and r.out.format(**g), r.kind, r.role)
    i, rest = int(m.group(1)), m.group(2)
    is_mtp = i >= n_layers
    if is_mtp and i >= n_layers + n_mtp:
        raise ConvertError(
            f"{file}: tensor {name}: layer {i} is beyond num_hidden_layers ({n_layers})"
            f" + num_nextn_predict_layers ({n_mtp})"
        )
    hit = _apply(rules.layer + (rules.mtp if is_mtp else ()), rest)
    if hit is None:
        raise ConvertError(f"{file}: tensor {name}: unexpected name for this model type")
    r, g = hit
    prefix = f"mtp.{i - n_layers}." if is_mtp else f"model.layers.{i}."
    out = r.out and prefix + r.out.format(**g)
    expert = int(g["e"]) if "e" in g else None
    return Match(out, r.kind, r.role, is_mtp, i, expert)
