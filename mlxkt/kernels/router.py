"""The fused DeepSeek router: everything after the logits matmul in one kernel (router.inc).

Scores (sigmoid or softmax), correction bias, group-limited selection, top-k and the
normalized, scaled weights: about a dozen small MLX ops replaced by one launch, for
decode-sized batches on a GPU. `route(gate, logits)` is the dispatch entry: the fused
result, or None when the caller should run the plain-MLX reference
(mlxkt.layers.moe.route_reference): on the CPU, with MLXKT_KERNELS=0, for prefill-sized
batches, for unsupported configurations, or when the kernel fails its one-time check.
"""

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from . import sources
from .dispatch import KernelFallbackWarning, checked, gpu_backend, kernels_enabled
from .moe import float_bits, kernel_fn

ROUTER = sources.KernelSpec(
    name="mlxkt_deepseek_router",
    body="router.inc",
    inputs=("logits", "bias"),
    outputs=("inds", "weights"),
)

MAX_EXPERTS = 1024  # one block of at most 1024 threads per token
MAX_TOP_K = 32
FUSED_MAX_TOKENS = 64  # larger batches (prefill) keep the plain ops
WEIGHT_TOLERANCE = 1e-4  # relative; the kernel's exp and sums round differently from MLX's


@dataclass(frozen=True)
class GateConfig:
    """What the routing depends on besides the logits (DeepseekGate's attributes)."""

    n_experts: int
    top_k: int
    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def from_gate(cls, gate) -> "GateConfig":
        return cls(int(gate.weight.shape[0]), int(gate.top_k), gate.scoring_func,
                   gate.topk_method, int(gate.n_group), int(gate.topk_group),
                   bool(gate.norm_topk_prob), float(gate.routed_scaling_factor))

    @property
    def grouped(self) -> bool:
        return self.n_group > 1 and self.topk_method in ("noaux_tc", "group_limited_greedy")

    @property
    def biased(self) -> bool:
        return self.topk_method == "noaux_tc"


def unsupported(cfg: GateConfig) -> Optional[str]:
    """Why the kernel cannot route with this configuration (None when it can)."""
    E, K = cfg.n_experts, cfg.top_k
    if not 1 <= E <= MAX_EXPERTS or not 1 <= K <= min(E, MAX_TOP_K):
        return f"{E} experts, top-{K} (the kernel takes up to {MAX_EXPERTS} and top-{MAX_TOP_K})"
    if cfg.scoring_func not in ("sigmoid", "softmax"):
        return f"scoring function {cfg.scoring_func!r}"
    if cfg.grouped:
        G, TG = cfg.n_group, cfg.topk_group
        if E % G or not 1 <= TG <= G:
            return f"{E} experts in {G} groups, {TG} kept"
        if cfg.topk_method == "noaux_tc" and E // G < 2:
            return "noaux_tc needs groups of at least 2 experts"
        if TG * (E // G) < K:
            return "fewer experts in the kept groups than top-k"
    return None


def threads(E: int) -> int:
    """Threads per block: a power of 2 with about one thread per expert."""
    return max(32, min(1024, 1 << (E - 1).bit_length()))


@lru_cache(maxsize=64)
def launch(cfg: GateConfig, N: int, block=None, lead=None):
    """The static part of a kernel call for one configuration and token count (lead: the
    outputs' leading dims, default (N,))."""
    T = block or threads(cfg.n_experts)
    if cfg.grouped:
        G, TG, gmode = cfg.n_group, cfg.topk_group, 2 if cfg.topk_method == "noaux_tc" else 1
    else:
        G, TG, gmode = 1, 1, 0
    K = cfg.top_k
    return dict(
        template=[("E", cfg.n_experts), ("K", K), ("T", T),
                  ("SCORE", int(cfg.scoring_func == "softmax")), ("BIAS", int(cfg.biased)),
                  ("G", G), ("TG", TG), ("GMODE", gmode),
                  ("NORM", int(cfg.norm_topk_prob and K > 1)),
                  ("SCALE_BITS", float_bits(cfg.routed_scaling_factor))],
        grid=(T, N, 1),
        threadgroup=(T, 1, 1),
        output_shapes=[(*((N,) if lead is None else lead), K)] * 2,
        output_dtypes=[mx.int32, mx.float32],
    )


def fused_route(logits, bias, gate_cfg: GateConfig, backend: str, block=None, lead=None):
    """(inds, weights) of the routing with the kernel: logits [..., E] -> [*lead, K] each
    (lead default: logits' leading dims; int32 experts by decreasing choice, float32
    weights). bias [E] is read for noaux_tc.
    The kernel reads logits of any float type (no conversion launch before it)."""
    # The kernel reads logits as flat rows: no reshapes around the launch.
    if gate_cfg.biased:
        b = bias if bias.dtype == mx.float32 else bias.astype(mx.float32)
    else:
        b = logits  # not read: the kernel's BIAS template is 0
    N = logits.size // logits.shape[-1]
    lead = logits.shape[:-1] if lead is None else lead
    return tuple(kernel_fn(backend, ROUTER)(inputs=[logits, b], **launch(gate_cfg, N, block, lead)))


def _warn(message: str):
    warnings.warn(message, KernelFallbackWarning, stacklevel=3)


def route(gate, logits, lead=None):
    """The fused routing of a DeepseekGate's float logits [..., E] as [*lead, K] each (lead
    default: logits' leading dims), or None: then the caller runs the reference (CPU,
    kernels off, prefill, unsupported, failed check)."""
    if not kernels_enabled():
        return None
    backend = gpu_backend()
    if backend is None or not 0 < logits.size <= FUSED_MAX_TOKENS * logits.shape[-1]:
        return None
    cfg = gate.__dict__.get("route_config")  # cached: Module attribute reads are slow
    if cfg is None:
        cfg = gate.route_config = GateConfig.from_gate(gate)
    why = unsupported(cfg) or (None if logits.shape[-1] == cfg.n_experts else "logits width")
    if why is not None:
        _warn(f"mlxkt: the fused router does not cover this gate ({why}); plain MLX ops route")
        return None
    bias = gate.get("e_score_correction_bias") if cfg.biased else None
    if (cfg.biased and bias is None) or not router_ready(backend, cfg, logits.dtype):
        return None
    return fused_route(logits, bias, cfg, backend, lead=lead)


@lru_cache(maxsize=None)
def router_ready(backend: str, cfg: GateConfig, dtype=mx.float32) -> bool:
    """Build the kernel for one configuration and logits type, check it against the
    reference once."""
    return checked(f"{backend} router", lambda: probe(backend, cfg, dtype=dtype),
                   WEIGHT_TOLERANCE)


# --- Checking: random problems, a float64 NumPy oracle, and the comparison ---------------

def route_numpy(logits, bias, cfg: GateConfig):
    """The routing in float64 (ties to the lower index), and each token's margin: the
    smallest gap, at the group or expert cut, that decides the selection."""
    # logits: [N, E] -> inds [N, K] (by decreasing choice), weights [N, K], margin [N]
    lg = np.asarray(logits, dtype=np.float64)
    N, E = lg.shape
    if cfg.scoring_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-lg))
    else:
        p = np.exp(lg - lg.max(axis=-1, keepdims=True))
        s = p / p.sum(axis=-1, keepdims=True)
    c = s + np.asarray(bias, dtype=np.float64) if cfg.biased else s.copy()
    margin = np.full(N, np.inf)
    if cfg.grouped:
        G, TG = cfg.n_group, cfg.topk_group
        grouped = np.sort(c.reshape(N, G, E // G), axis=-1)
        gs = grouped[..., -2:].sum(-1) if cfg.topk_method == "noaux_tc" else grouped[..., -1]
        order = np.argsort(-gs, axis=-1, kind="stable")
        if TG < G:
            ranked = np.take_along_axis(gs, order, axis=-1)
            margin = ranked[:, TG - 1] - ranked[:, TG]
        dropped = np.zeros((N, G), dtype=bool)
        np.put_along_axis(dropped, order[:, TG:], True, axis=-1)
        c[np.repeat(dropped, E // G, axis=-1)] = -np.inf
    K = cfg.top_k
    order = np.argsort(-c, axis=-1, kind="stable")
    inds = order[:, :K]
    if K < E:
        ranked = np.take_along_axis(c, order[:, K - 1:K + 1], axis=-1)
        margin = np.minimum(margin, ranked[:, 0] - ranked[:, 1])
    w = np.take_along_axis(s, inds, axis=-1)
    if K > 1 and cfg.norm_topk_prob:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, w * cfg.routed_scaling_factor, margin


def random_inputs(cfg: GateConfig, N: int, seed=0, min_margin=1e-4, dtype=mx.float32):
    """Logits [N, E] (dtype) and bias [E] (float32) whose routing is decided by gaps of at
    least min_margin, so rounding differences cannot change the selection."""
    rng = np.random.default_rng(seed)
    E = cfg.n_experts
    bias = rng.uniform(-0.2, 0.2, E).astype(np.float32)
    rows = []
    while len(rows) < N:
        lg = (2.0 * rng.standard_normal((4 * N, E))).astype(np.float32)
        lg = np.array(mx.array(lg).astype(dtype).astype(mx.float32))  # the values as stored
        _, _, margin = route_numpy(lg, bias, cfg)
        rows += list(lg[margin >= min_margin])
    return mx.array(np.stack(rows[:N])).astype(dtype), mx.array(bias)


def route_error(inds, weights, ref_inds, ref_weights) -> float:
    """inf when a token's expert sets differ, else the largest relative weight error
    (weights matched by expert: the order of the K experts does not matter)."""
    K = ref_inds.shape[-1]
    a, b = (np.array(i).reshape(-1, K).astype(np.int64) for i in (inds, ref_inds))
    wa, wb = (np.array(w.astype(mx.float32) if isinstance(w, mx.array) else w,
                       dtype=np.float64).reshape(-1, K) for w in (weights, ref_weights))
    oa, ob = np.argsort(a, axis=-1), np.argsort(b, axis=-1)
    if not np.array_equal(np.take_along_axis(a, oa, -1), np.take_along_axis(b, ob, -1)):
        return float("inf")
    wa, wb = np.take_along_axis(wa, oa, -1), np.take_along_axis(wb, ob, -1)
    if not np.all(np.isfinite(wa)):
        return float("inf")
    return float(np.max(np.abs(wa - wb) / np.maximum(np.abs(wb), 1e-30)))


def probe(backend: str, cfg: GateConfig, N: int = 5, block=None, dtype=mx.float32) -> float:
    """route_error of the kernel against the reference on random logits of type dtype."""
    from ..layers.moe import route_reference  # the layers import this module

    logits, bias = random_inputs(cfg, N, dtype=dtype)
    inds, weights = fused_route(logits, bias, cfg, backend, block)
    ref = route_reference(logits.astype(mx.float32), bias if cfg.biased else None, cfg)
    mx.eval(inds, weights, *ref)
    return route_error(inds, weights, *ref)


CONFIGS = {
    "deepseek-v3": GateConfig(256, 8, "sigmoid", "noaux_tc", 8, 4, True, 2.5),
    "deepseek-v2": GateConfig(160, 6, "softmax", "group_limited_greedy", 8, 3, False, 16.0),
    "deepseek-v2-lite": GateConfig(64, 6, "softmax", "greedy", 1, 1, False, 1.0),
}


def selftest(backend: str, echo=print, tokens=(1, 8)):
    """The fused router against the reference for the released DeepSeek gates, with eval-only
    µs per call of both (for `mlxkt selftest`); one row per (config, tokens)."""
    from ..layers.moe import route_reference
    from .selftest import median_time, timed_row  # selftest imports this module

    rows = []
    echo(f"{'router':18} {'tok':>3} {'status':>6} {'w err':>9} {'fused us':>9} {'ref us':>9}")
    for name, cfg in CONFIGS.items():
        for n in tokens:
            def measure():
                err = probe(backend, cfg, N=n)
                sets = [random_inputs(cfg, n, seed=s) for s in range(8)]
                fused_s = median_time(lambda lg, b: fused_route(lg, b, cfg, backend), sets,
                                      prebuilt=True)
                ref_s = median_time(lambda lg, b: route_reference(lg, b, cfg), sets,
                                    prebuilt=True)
                return err, fused_s, ref_s

            rows.append(timed_row({"kernel": "router", "shape": name, "tokens": n}, name, n,
                                  measure, WEIGHT_TOLERANCE, echo,
                                  us_keys=("fused_us", "reference_us"), widths=(18, 3)))
    return rows
