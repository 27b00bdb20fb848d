"""`mlxkt.optimize(model)`: swap mlxkt's kernel modules into a model, mlx-lm's included.

A small declarative rule table, in the spirit of KTransformers' injection rules: each rule
names a module path pattern, a module class and the kind of replacement. MoE blocks become a
KernelMoE that keeps their parameters (same names, same arrays) and runs the routed experts
through mlxkt.kernels (fused gate/up/SwiGLU, then fused down + router weights + sum); 4-bit
(2/8-bit) linear layers become a KernelQuantizedLinear, whose 1-to-8-token calls run the
dense GEMV kernels (attention projections, shared experts, lm_head; on CUDA by default,
MLXKT_GEMV=0/1 to choose), and MLA's per-head embed_q / unembed_out (mlx-lm's
QuantizedMultiLinear) a KernelQuantizedMultiLinear, all heads in one launch.

    from mlx_lm import load
    import mlxkt
    model, tokenizer = load("mlx-community/DeepSeek-V3-0324-4bit")
    model = mlxkt.optimize(model)
"""

import re
from typing import Callable, Dict, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from .kernels.dispatch import gemv_enabled, kernel_backend
from .kernels.qgemv import linear_like, quant_params
from .layers.experts import RoutedExperts
from .layers.qlinear import KernelQuantizedLinear, KernelQuantizedMultiLinear
from .loader_utils import swap_modules


class Rule(NamedTuple):
    path: str  # regular expression searched in the module's dotted path
    cls: str  # the module's class, "module.QualName"
    kind: str  # "linear", or a MoE block's routing: a key of ROUTERS


RULES = (
    Rule(r"\.mlp$", "mlx_lm.models.deepseek_v3.DeepseekV3MoE", "deepseek"),
    Rule(r"\.mlp$", "mlx_lm.models.deepseek_v32.DeepseekV32MoE", "deepseek"),
    Rule(r"\.mlp$", "mlx_lm.models.deepseek_v2.DeepseekV2MoE", "deepseek"),
    Rule(r"\.mlp$", "mlx_lm.models.deepseek.DeepseekMoE", "deepseek"),
    Rule(r"\.block_sparse_moe$", "mlx_lm.models.mixtral.MixtralSparseMoeBlock", "mixtral"),
)
LINEAR_RULES = (Rule(r"", "mlx.nn.layers.quantized.QuantizedLinear", "linear"),
                Rule(r"", "mlx_lm.models.mla.QuantizedMultiLinear", "multilinear"))


def deepseek_route(block, x):
    # The block's own gate: softmax or sigmoid scoring, group-limited top-k, scaling.
    return block.gate(x)


def mixtral_route(block, x):
    gates = block.gate(x)
    k = block.num_experts_per_tok
    inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
    return inds, scores


ROUTERS: Dict[str, Callable] = {"deepseek": deepseek_route, "mixtral": mixtral_route}

# Plain attributes of the replaced blocks that other code may read.
KEPT_ATTRIBUTES = ("config", "num_experts_per_tok", "top_k", "hidden_dim", "ffn_dim",
                   "num_experts")


class KernelMoE(nn.Module):
    """A MoE block with the parameters of the one it replaces and a fused expert path."""

    def __init__(self, block: nn.Module, router: str):
        super().__init__()
        self.gate = block.gate
        sw = block.switch_mlp
        self.switch_mlp = RoutedExperts.wrap(sw.gate_proj, sw.up_proj, sw.down_proj)
        if "shared_experts" in block:
            self.shared_experts = block.shared_experts
        for name in KEPT_ATTRIBUTES:
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))
        self.router = router

    def __call__(self, x):
        # x: [B, L, D] -> [B, L, D]
        inds, scores = ROUTERS[self.router](self, x)
        return self.switch_mlp(x, inds, scores, self.get("shared_experts"))


def _class_name(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _replaceable(module, kind: str) -> bool:
    if kind == "linear":
        return quant_params(module) is not None
    if kind == "multilinear":  # MLA's per-head embed_q / unembed_out
        return (module.mode == "affine" and module.get("biases") is not None
                and module.weight.ndim == 3 and module.weight.dtype == mx.uint32)
    sw = module.get("switch_mlp") if isinstance(module, dict) else None
    if sw is None or not all(k in sw for k in ("gate_proj", "up_proj", "down_proj")):
        return False
    # Only SwiGLU experts, and not a block sharded across devices (its call all-reduces).
    act = getattr(sw, "activation", None)
    if act is not None and type(act).__name__ != "SwiGLU":
        return False
    return getattr(module, "sharding_group", None) is None


def _kernel_module(module, kind: str) -> nn.Module:
    if kind == "linear":
        return KernelQuantizedLinear.wrap(module)
    if kind == "multilinear":
        return KernelQuantizedMultiLinear.wrap(module)
    return KernelMoE(module, kind)


def plain_linears(model: nn.Module) -> int:
    """Undo optimize's linear swaps (nn.QuantizedLinear and mlx-lm's QuantizedMultiLinear
    again, same arrays), stacked projections included (layers/fused_rows.py): for A/B runs."""
    from .layers.fused_rows import unfuse

    unfuse(model)
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, KernelQuantizedLinear):
            swaps.append((path, linear_like(m)))
        elif isinstance(m, KernelQuantizedMultiLinear):
            swaps.append((path, m.unwrap()))
    swap_modules(model, swaps)
    return len(swaps)


def optimize(model: nn.Module, rules=RULES, verbose: bool = False,
             linears: Optional[bool] = None) -> nn.Module:
    """Replace every module matched by `rules` with its kernel version, in place; returns model.
    linears (default: kernels.dispatch.gemv_enabled, on CUDA) adds LINEAR_RULES, the dense
    GEMV kernels (quantized linears, and MLA's per-head linears on the lanes kernel)."""
    if gemv_enabled(kernel_backend()) if linears is None else linears:
        rules = tuple(rules) + LINEAR_RULES
    swaps = []
    for path, module in model.named_modules():
        for rule in rules:
            if (_class_name(module) == rule.cls and re.search(rule.path, "." + path)
                    and _replaceable(module, rule.kind)):
                swaps.append((path, _kernel_module(module, rule.kind)))
                break
    swap_modules(model, swaps)
    if verbose:
        n = sum(isinstance(m, KernelMoE) for _, m in swaps)
        print(f"[mlxkt] optimize: {n} MoE blocks and {len(swaps) - n} linear layers now use "
              "mlxkt kernels")
    return model
