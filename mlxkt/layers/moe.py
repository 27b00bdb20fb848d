"""Routers and MoE blocks shared by the DeepSeek and Mixtral models."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from ..kernels.gate_norm import normed_logits
from ..kernels.router import route
from .experts import RoutedExperts
from .qlinear import norm_linear


class MLP(nn.Module):
    """SwiGLU MLP (dense layers and shared experts)."""

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def gate_up(self, x):
        """Both input-side projections of x (the bench variant fused-proj makes them one launch)."""
        return self.gate_proj(x), self.up_proj(x)

    def __call__(self, x, residual=None):
        # x: [..., D] -> [..., D] (+ residual, inside the down projection's GEMV launch)
        gate, up = self.gate_up(x)
        return norm_linear(self.down_proj, nn.silu(gate) * up, residual=residual)


class DeepseekGate(nn.Module):
    """Top-k routing: softmax (V2) or sigmoid + bias (V3 `noaux_tc`), optionally group-limited."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.n_routed_experts
        self.top_k = args.num_experts_per_tok
        self.scoring_func = args.scoring_func
        self.topk_method = args.topk_method
        self.n_group = args.n_group or 1
        self.topk_group = args.topk_group or self.n_group
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = mx.zeros((E, args.hidden_size))
        if self.topk_method == "noaux_tc":
            # Kept in float32: it decides close calls between experts.
            self.e_score_correction_bias = mx.zeros((E,), dtype=mx.float32)

    def __call__(self, x):
        # x: [..., D] -> inds [..., K] (int), weights [..., K] (float32)
        # [N, D] @ [D, E]: 2 graph nodes where x @ weight.T makes 4 (a decode step walks
        # every node on the host).
        return self.route_logits(x.reshape(-1, x.shape[-1]) @ self.weight_t(), x.shape[:-1])

    def route_logits(self, logits, lead):
        """(inds, weights) [*lead, K] of logits [N, E] (any float type)."""
        fused = route(self, logits, lead)  # one kernel on a GPU for decode-sized batches
        if fused is not None:
            return fused
        logits = logits.reshape(*lead, -1).astype(mx.float32)
        return route_reference(logits, self.get("e_score_correction_bias"), self)

    def normed(self, h, norm, forced=None):
        """(inds, weights, norm(h)), the norm and the logits by one kernel
        (kernels/gate_norm.py), or None where it does not run."""
        got = normed_logits(h, self.weight, norm, forced)
        if got is None:
            return None
        logits, xn = got
        return (*self.route_logits(logits, h.shape[:-1]), xn)

    def weight_t(self):
        """weight.T as a view held beside it (a plain attribute, not a parameter), evaluated
        at once: a compiled decode trace then takes it as a constant instead of recording a
        transpose for every step."""
        held = self.__dict__.get("held_t")
        if held is None or held[0] is not self.weight:
            held = self.__dict__["held_t"] = (self.weight, self.weight.T)
            mx.eval(held[1])  # a view: no copy
        return held[1]


def route_reference(logits, bias, cfg):
    """The routing in plain MLX ops (always correct; the fused router is checked against it).

    cfg: a DeepseekGate or a kernels.router.GateConfig (same attribute names); bias [E]
    float32 is used by noaux_tc only.
    """
    # logits: [..., E] float32 -> inds [..., K] (uint32), weights [..., K] (float32)
    if cfg.scoring_func == "sigmoid":
        scores = mx.sigmoid(logits)
    else:
        scores = mx.softmax(logits, axis=-1, precise=True)
    choice = scores
    if cfg.topk_method == "noaux_tc":
        choice = scores + bias
    if cfg.n_group > 1 and cfg.topk_method in ("noaux_tc", "group_limited_greedy"):
        grouped = mx.unflatten(choice, -1, (cfg.n_group, -1))  # [..., G, E/G]
        if cfg.topk_method == "noaux_tc":
            group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)
        else:
            group_scores = grouped.max(axis=-1)
        drop = cfg.n_group - cfg.topk_group
        if drop > 0:
            dropped = mx.argpartition(group_scores, kth=drop - 1, axis=-1)[..., :drop]
            neg = mx.array(-float("inf"), choice.dtype)
            grouped = mx.put_along_axis(grouped, dropped[..., None], neg, axis=-2)
        choice = mx.flatten(grouped, -2, -1)
    k = cfg.top_k
    inds = mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k]
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if k > 1 and cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, weights * cfg.routed_scaling_factor


class DeepseekMoE(nn.Module):
    # None: MLXKT_GATE_NORM decides (off when unset); False/True: the input norm (when the
    # caller hands it over) and the router logits as two launches / as one on a GPU.
    gate_norm: Optional[bool] = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        I = args.moe_intermediate_size
        self.gate = DeepseekGate(args)
        self.switch_mlp = RoutedExperts(args.hidden_size, I, args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, I * args.n_shared_experts)

    def __call__(self, x, residual=None, norm=None):
        # x: [B, L, D] -> [B, L, D] (+ residual: added inside the expert kernels at decode).
        # norm: the block's input is norm(x) (one launch with the router logits at decode).
        got = None if norm is None else self.gate.normed(x, norm, self.gate_norm)
        if got is not None:
            inds, weights, x = got
        else:
            x = x if norm is None else norm(x)
            inds, weights = self.gate(x)
        sw, shared = self.switch_mlp, self.get("shared_experts")
        if isinstance(sw, RoutedExperts):
            return sw(x, inds, weights, shared, residual)
        y = sw(x, inds, weights, shared)  # e.g. distributed.run.RecordRouting
        return y if residual is None else residual + y


class MixtralMoE(nn.Module):
    """Mixtral's sparse block: softmax over the top-k router logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        E = args.num_local_experts
        self.gate = nn.Linear(args.hidden_size, E, bias=False)
        self.switch_mlp = RoutedExperts(args.hidden_size, args.intermediate_size, E)

    def __call__(self, x):
        logits = self.gate(x).astype(mx.float32)
        k = self.top_k
        inds = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        weights = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1)
        return self.switch_mlp(x, inds, weights)
