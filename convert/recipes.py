"""Quantization recipes: which bits each kind of weight gets.

A recipe maps a rule role to a bit width, or None to keep that weight unquantized. Roles:
embed, head, attn, dense_mlp, shared_expert, routed_expert, mtp_proj (quantizable modules) and
norm, bias, router, router_bias (never quantized). `DEFAULT` in a recipe means `--bits`.
"""

from typing import Optional

from .errors import ConvertError

DEFAULT = "default"

RECIPES = {
    # Every quantizable module at --bits.
    "uniform": {
        r: DEFAULT
        for r in ("embed", "head", "attn", "dense_mlp", "shared_expert", "routed_expert", "mtp_proj")
    },
    # Routed experts (most of the parameters) at --bits (4 by default); everything every token
    # passes through at 8; embeddings and output head at 6.
    "deepseek-mixed": {
        "routed_expert": DEFAULT,
        "attn": 8, "shared_expert": 8, "dense_mlp": 8, "mtp_proj": 8,
        "embed": 6, "head": 6,
    },
}


def check_recipe(name: Optional[str]) -> str:
    name = name or "uniform"
    if name not in RECIPES:
        raise ConvertError(f"unknown recipe {name!r} (known: {', '.join(sorted(RECIPES))})", 2)
    return name


def quant_params(recipe: str, role: str, in_dim: int, bits: int, group_size: int) -> Optional[dict]:
    """{"group_size", "bits"} for a quantizable module, or None to keep it unquantized."""
    b = RECIPES[recipe].get(role)
    if b is None:
        return None
    b = bits if b == DEFAULT else b
    if in_dim % group_size != 0:
        return None  # mx.quantize needs whole groups along the input dimension
    return {"group_size": group_size, "bits": b}
