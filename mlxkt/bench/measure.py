"""Timing primitives shared by both engines: copy bandwidth, prefill, decode at a context,
active weight bytes per token, graph size and graph-build time of one decode step."""

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


@dataclass
class Engine:
    """One engine's model plus the generation loop it ships with."""

    name: str
    model: nn.Module
    make_cache: Callable[[], list]
    # (prompt [L] int array, cache, max_tokens) -> iterator of token ids
    stream: Callable[[mx.array, list, int], Iterator[int]]
    weights_bytes: int = 0
    notes: List[str] = field(default_factory=list)
    variant: str = ""  # experimental variant applied (mlxkt.bench.variants)
    decode_only: bool = False  # the variant leaves prefill as it is: do not time it again
    prefill_step: Optional[int] = None  # mlxkt's prefill chunk length; None: the engine's own


def mlxkt_engine(path, dtype=None) -> Engine:
    from .. import loader
    from ..generate import generate_step

    before = mx.get_active_memory()
    model, _ = loader.load(path, dtype=dtype, mtp=False)
    used = mx.get_active_memory() - before

    def stream(prompt, cache, n):
        step = {} if engine.prefill_step is None else {"prefill_step_size": engine.prefill_step}
        for tok, _, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache,
                                       mtp=False, **step):
            yield tok

    engine = Engine("mlxkt", model, model.make_cache, stream, used)
    return engine


def mlx_lm_engine(path, dtype=None) -> Engine:
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from ..loader_utils import cast_floats

    before = mx.get_active_memory()
    model, _ = mlx_lm.load(str(path), lazy=True)
    notes = []
    if dtype is not None:
        cast_floats(model, dtype, lambda k: "e_score_correction_bias" not in k)
        notes.append(f"floats cast to {dtype}")
    mx.eval(model.parameters())
    used = mx.get_active_memory() - before

    def stream(prompt, cache, n):
        for tok, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache):
            yield tok

    return Engine("mlx-lm", model, lambda: make_prompt_cache(model), stream, used, notes)


def activation_dtype(model) -> mx.Dtype:
    return model.model.norm.weight.dtype


def copy_bandwidth(nbytes: int, reps: int = 10) -> float:
    """GB/s of an elementwise copy y = x + 1 (bytes read + bytes written) / time."""
    x = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(x)
    mx.eval(x + 1)  # warm up (and compile the kernel)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(x + 1)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best / 1e9


def active_bytes(model) -> dict:
    """Weight bytes one token reads: everything but the routed experts, k/E of those, and
    one row of the embedding."""
    args = model.args
    E = getattr(args, "n_routed_experts", None) or getattr(args, "num_local_experts", None) or 1
    k = args.num_experts_per_tok
    out = {"routed_all": 0, "routed_active": 0.0, "other": 0, "embed_row": 0.0}
    for name, a in tree_flatten(model.parameters()):
        if "switch_mlp" in name:
            out["routed_all"] += a.nbytes
            out["routed_active"] += a.nbytes * k / E
        elif "embed_tokens" in name:
            out["embed_row"] += a.nbytes / args.vocab_size
        else:
            out["other"] += a.nbytes
    out["per_token"] = out["routed_active"] + out["other"] + out["embed_row"]
    return out


def random_prompt(n: int, vocab: int, seed: int = 0) -> mx.array:
    return mx.random.randint(2, vocab, (n,), key=mx.random.key(seed))


def fill_cache(engine: Engine, context: int, seed: int = 0) -> list:
    """A fresh cache holding `context` positions of random entries (attention cost does
    not depend on the values, so decode at 32K needs no 32K prefill)."""
    probe = engine.make_cache()
    engine.model(mx.array([[2]]), cache=probe)  # learn each layer's cache shapes and dtype
    cache = engine.make_cache()
    if context <= 0:
        return cache
    key = mx.random.key(seed)
    for c, p in zip(cache, probe):
        k = mx.random.normal((1, p.keys.shape[1], context, p.keys.shape[-1]), key=key)
        v = mx.random.normal((1, p.values.shape[1], context, p.values.shape[-1]), key=key)
        c.update_and_fetch(k.astype(p.keys.dtype), v.astype(p.values.dtype))
    mx.eval([c.state for c in cache])
    return cache


def time_prefill(engine: Engine, n: int, vocab: int) -> dict:
    """Time to first token for an (n+1)-token prompt on an empty cache: both engines run
    n tokens through their chunked prefill (whole chunks for n a multiple of 512, which
    also keeps MLX CUDA's quantized-matmul row tiles full), then the first decode step, as
    their prompt_tps count it. tok/s = n / time."""
    prompt = random_prompt(n + 1, vocab)
    mx.eval(prompt)
    cache = engine.make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    gen = engine.stream(prompt, cache, 2)
    next(gen)
    dt = time.perf_counter() - t0
    gen.close()
    peak = mx.get_peak_memory() - base
    del cache
    return {"tokens": n, "prompt_tokens": n + 1, "seconds": dt, "tok_s": n / dt,
            "transient_peak_gb": peak / 1e9}


def time_decode(engine: Engine, context: int, tokens: int, skip: int = 2) -> dict:
    """Steady decode rate with `context` positions already in the cache."""
    cache = fill_cache(engine, context - 1)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    stamps = []
    for _ in engine.stream(mx.array([3]), cache, tokens + skip):
        stamps.append(time.perf_counter())
    peak = mx.get_peak_memory() - base
    steady = stamps[skip:]
    gaps = sorted(b - a for a, b in zip(steady, steady[1:]))
    mean = (steady[-1] - steady[0]) / (len(steady) - 1)
    return {"context": context, "tokens": len(steady), "ms_per_token": 1e3 * mean,
            "ms_p50": 1e3 * gaps[len(gaps) // 2], "tok_s": 1 / mean,
            "transient_peak_gb": peak / 1e9}


VIEW_OPS = {"Reshape", "Broadcast", "Slice", "Squeeze", "ExpandDims", "Transpose", "AsStrided",
            "StopGradient", "Depends", "Split", "Unflatten", "Flatten", "View"}


def graph_ops(y) -> list:
    """The primitive of every unevaluated node of y's graph (mx.export_to_dot), views too."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "g.dot"
        mx.export_to_dot(str(f), y)
        return re.findall(r'label ="([^"]+)", shape=rectangle', f.read_text())


def op_counts(labels) -> dict:
    """{primitive: count}, most frequent first."""
    counts = {}
    for x in labels:
        counts[x] = counts.get(x, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def decode_graph(engine: Engine, context: int = 16, reps: int = 5) -> dict:
    """Size of one decode step's graph (nodes, and nodes that are not mere views) and the
    host time to build it (Python + MLX graph construction, nothing evaluated)."""
    tok = mx.array([[3]])
    build = []
    for _ in range(reps):
        cache = fill_cache(engine, context)  # fresh: update_and_fetch mutates the cache arrays
        t0 = time.perf_counter()
        y = engine.model(tok, cache=cache)[:, -1].argmax(-1)
        build.append(time.perf_counter() - t0)
    labels = graph_ops(y)
    kernels = [x for x in labels if x not in VIEW_OPS]
    del y, cache
    return {"nodes": len(labels), "non_view_nodes": len(kernels),
            "build_ms": 1e3 * sorted(build)[len(build) // 2],
            "top_ops": dict(list(op_counts(kernels).items())[:12])}
