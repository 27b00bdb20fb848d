"""Where one decode step's time goes: each sub-module of every layer timed on its own,
replaying the inputs it saw in a real decode step at a given context.

Stateless modules (projections, norms, router, experts, lm_head) are replayed `reps` times
and evaluated once, which measures their throughput as a GPU stream runs them. Modules that
write the cache (attention, a whole layer, the model) are evaluated after each call with the
cache position reset, and the cost of one empty evaluation is subtracted. "rest" rows are a
parent minus its timed children: rope, the score matmuls, softmax, the cache update, reshapes
and routing glue. Works for mlxkt and mlx-lm DeepSeek models (same module names). Where
the routed-expert kernels compute the shared expert, it is not timed apart: its time is in
switch_mlp's (a stand-in for the shared MLP would take it out of the kernels' launches).
MLA's stacked q_a/kv_a projection (layers/fused_rows.py) is timed as the two linears.
"""

import time

import mlx.core as mx
import mlx.nn as nn

from ..kernels.dispatch import kernel_backend, shared_fits
from ..layers.decode_compile import eager_decode
from ..layers.experts import RoutedExperts
from ..layers.fused_rows import unfused
from .measure import Engine, fill_cache

ATTN = ["q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
        "kv_a_layernorm", "embed_q", "unembed_out", "o_proj"]
MLP = ["gate", "switch_mlp", "shared_experts", "gate_proj", "up_proj", "down_proj"]
LAYER = ["input_layernorm", "post_attention_layernorm"]
TOP = ["model.embed_tokens", "model.norm", "lm_head"]


class _Recorder(nn.Module):
    """Stands in for a module during one forward and keeps the arguments it was given."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "calls", [])

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.inner(*args, **kwargs)


def _get(root, path):
    m = root
    for p in path.split("."):
        if not isinstance(m, nn.Module) or p not in m:
            return None
        m = m[p]
    return m if isinstance(m, nn.Module) else None


def _set(root, path, value):
    *parents, last = path.split(".")
    m = root
    for p in parents:
        m = m[p]
    m[last] = value


def _fused_shared(block) -> bool:
    """Whether the routed-expert kernels compute this MoE block's shared expert."""
    sw, shared = block.get("switch_mlp"), block.get("shared_experts")
    return (isinstance(sw, RoutedExperts) and sw.fuse_shared and shared is not None
            and kernel_backend() is not None and shared_fits(shared, sw.gate_proj, sw.down_proj))


def _targets(model):
    """(key, owner, path) for every module to time; key groups layers together."""
    out = [(p, model, p) for p in TOP if _get(model, p) is not None]
    for i, layer in enumerate(model.layers):
        mlp_name = "mlp" if "mlp" in layer else "block_sparse_moe"
        paths = (LAYER + [f"self_attn.{c}" for c in ATTN] + [f"{mlp_name}.{c}" for c in MLP]
                 + ["self_attn", mlp_name])
        kind = "moe" if _get(layer, f"{mlp_name}.switch_mlp") is not None else "dense"
        if kind == "moe" and _fused_shared(layer[mlp_name]):
            paths = [p for p in paths if p != f"{mlp_name}.shared_experts"]
        for p in paths:
            if _get(layer, p) is not None:
                head, dot, rest = p.partition(".")
                if head == mlp_name:  # group MoE and dense MLP layers apart
                    head = "mlp" if kind == "dense" else "moe"
                key = head + dot + rest
                out.append((key, layer, p))
    return out


def _sync_cost(reps):
    x = mx.zeros((16,))
    mx.eval(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(x + 1)
    return (time.perf_counter() - t0) / reps


def _time_stateless(fn, calls, reps):
    out = [fn(*a, **k) for a, k in calls]  # warm-up
    mx.eval(out)
    t0 = time.perf_counter()
    out = [fn(*a, **k) for _ in range(reps) for a, k in calls]
    mx.eval(out)
    return (time.perf_counter() - t0) / reps


def _time_stateful(fn, calls, caches, offsets, reps, sync):
    def once():
        for c, o in zip(caches, offsets):
            c.offset = o
        mx.eval([fn(*a, **k) for a, k in calls])

    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return max((time.perf_counter() - t0) / reps - sync, 0.0)


def breakdown(engine: Engine, context: int, reps: int = 10, tokens: int = 1) -> dict:
    """ms per forward of `tokens` tokens (1: a decode step; more: a prefill chunk) ending at
    position `context`, for each component, summed over layers. Compiled decode layers
    replay traces that the module hooks cannot see, so they are timed eagerly
    ("eager_modules": true)."""
    with eager_decode(engine.model) as compiled, unfused(engine.model):
        return dict(_breakdown(engine, context, reps, tokens), eager_modules=compiled)


def _breakdown(engine: Engine, context: int, reps: int, tokens: int) -> dict:
    model = engine.model
    cache = fill_cache(engine, context - tokens)
    offsets = [c.offset for c in cache]
    targets = _targets(model)
    recorders = []
    for key, owner, path in targets:
        rec = _Recorder(_get(owner, path))
        _set(owner, path, rec)
        recorders.append((key, owner, path, rec))
    tok = mx.random.randint(2, model.args.vocab_size, (1, tokens), key=mx.random.key(1))
    try:
        logits = model(tok, cache=cache)
    finally:  # a failed forward must not leave the stand-ins in the model
        for _, owner, path, rec in reversed(recorders):  # restore, innermost last
            _set(owner, path, rec.inner)
    mx.eval(logits, [rec.calls for *_, rec in recorders])

    sync = _sync_cost(reps)
    total = _time_stateful(lambda: model(tok, cache=cache), [((), {})], cache, offsets, reps, sync)
    times = {}
    for key, owner, path, rec in recorders:
        fn = _get(owner, path)
        if path in ("self_attn",):
            dt = _time_stateful(fn, rec.calls, cache, offsets, reps, sync)
        else:
            dt = _time_stateless(fn, rec.calls, reps)
        times[key] = times.get(key, 0.0) + dt
    rows = _rows(times, total)
    return {"context": context, "tokens": tokens, "forward_ms": 1e3 * total, "sync_ms": 1e3 * sync,
            "rows": rows}


def _rows(times: dict, total: float) -> list:
    """Leaf components plus 'rest' rows (parent minus children) and an 'unattributed' row."""
    rows = {}
    for key, t in times.items():
        if key in ("self_attn", "moe", "mlp") and any(k.startswith(key + ".") for k in times):
            children = sum(v for k, v in times.items() if k.startswith(key + "."))
            rows[f"{key} rest"] = t - children
        else:
            rows[key] = t
    rows["unattributed (glue, residual adds)"] = total - sum(rows.values())
    ordered = sorted(rows.items(), key=lambda kv: -kv[1])
    return [{"component": k, "ms": 1e3 * v, "share": v / total if total else 0.0}
            for k, v in ordered]
