"""`mlxkt bench`: mlxkt against mlx-lm on the same weights, in the same process.

Every measurement is repeated `repeats` times with the engines interleaved (A B A B ...),
so slow drifts of the machine hit both; the best repeat is reported and the ratio is
taken between numbers of the same run only.
"""

import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from . import measure
from .breakdown import breakdown


@dataclass
class BenchOptions:
    model: Optional[str] = None  # a converted MLX directory; None: a synthetic slice
    preset: str = "dsv3"
    layers: int = 8
    experts: int = 32
    top_k: Optional[int] = None
    dense_layers: int = 0
    vocab: Optional[int] = None
    bits: int = 4
    group_size: int = 64
    prefill: List[int] = field(default_factory=lambda: [512, 4096])
    contexts: List[int] = field(default_factory=lambda: [1024, 8192])
    decode_tokens: int = 32
    repeats: int = 2
    breakdown_contexts: List[int] = field(default_factory=lambda: [1024])
    breakdown_reps: int = 10
    breakdown_prefill: List[int] = field(default_factory=list)  # chunk sizes to break down
    engines: List[str] = field(default_factory=lambda: ["mlxkt", "mlx-lm"])
    variants: List[str] = field(default_factory=list)
    mlx_lm_dtype: Optional[str] = None  # None: as loaded
    dtype: Optional[str] = None  # mlxkt's activation dtype; None: its default
    copy_gb: Optional[float] = None
    max_seconds: Optional[float] = None
    workdir: Optional[str] = None
    out: Optional[str] = None
    commit: Optional[str] = None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "mlx": mx.__version__, "device": str(mx.default_device())}
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:
        pass
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if gpu.returncode == 0:
            info["gpu"] = gpu.stdout.strip()
    except Exception:
        pass
    if mx.metal.is_available():
        info["gpu"] = mx.metal.device_info().get("device_name", "Apple GPU")
    if "gpu" not in info:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse",
                            "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except Exception:
        return None


def _dtype(name):
    return getattr(mx, name) if name else None


def _engines(path, o: BenchOptions) -> list:
    from .variants import apply_variant

    out = []
    for spec in o.engines:
        # "mlxkt", "mlx-lm", or either with ":dtype" (e.g. mlx-lm:float32) as an extra column
        name, _, dt = spec.partition(":")
        if name == "mlxkt":
            e = measure.mlxkt_engine(path, _dtype(dt or o.dtype))
        elif name == "mlx-lm":
            e = measure.mlx_lm_engine(path, _dtype(dt or o.mlx_lm_dtype))
        else:
            raise ValueError(f"unknown engine {spec!r} (mlxkt, mlx-lm, optionally :dtype)")
        e.name = spec
        out.append(e)
    for v in o.variants:
        e = measure.mlxkt_engine(path, _dtype(o.dtype))
        apply_variant(e, v)
        out.append(e)
    return out


def run_bench(o: BenchOptions, log=print) -> dict:
    t_start = time.perf_counter()
    tmp = None
    result = {"options": asdict(o), "machine": machine_info(),
              "commit": o.commit or git_commit(), "command": " ".join(sys.argv)}
    out = Path(o.out) if o.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def save():
        if out:
            (out / "bench.json").write_text(json.dumps(result, indent=1))

    def time_left():
        return o.max_seconds is None or time.perf_counter() - t_start < o.max_seconds

    path = o.model
    if path is None:
        from .synth import slice_config, write_model_in_child

        config = slice_config(o.preset, o.layers, o.experts, o.top_k, o.dense_layers, o.vocab)
        if o.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="mlxkt-bench-")
        root = Path(o.workdir or tmp.name) / f"synth-{o.preset}-{o.layers}l-{o.experts}e-{o.bits}b"
        t0 = time.perf_counter()
        path = write_model_in_child(root, config, o.bits, o.group_size)
        result["synth_write_s"] = time.perf_counter() - t0
        log(f"synthetic model written to {path} in {result['synth_write_s']:.1f} s")
    result["model_path"] = str(path)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    copy_bytes = int((o.copy_gb or (2.0 if mx.default_device() == mx.gpu else 0.25)) * 1e9)
    result["copy_gbps"] = measure.copy_bandwidth(copy_bytes)
    log(f"copy bandwidth {result['copy_gbps']:.1f} GB/s")

    engines = _engines(path, o)
    result["load_s"] = time.perf_counter() - t0
    model_cfg = engines[0].model.args
    vocab = model_cfg.vocab_size
    res = result["engines"] = {}
    for e in engines:
        ab = measure.active_bytes(e.model)
        res[e.name] = {"weights_gb": e.weights_bytes / 1e9, "active_gb_per_token": ab["per_token"] / 1e9,
                       "active_bytes": ab, "notes": e.notes, "dtype": str(measure.activation_dtype(e.model)),
                       "prefill": {}, "prefill_new": {}, "decode": {}}
    save()

    # Warm-up: the first use of each kernel compiles it (minutes for MLX CUDA on a fresh
    # machine); reported separately and never mixed into the timings.
    for e in list(engines):
        t0 = time.perf_counter()
        try:
            if not e.decode_only:
                measure.time_prefill(e, min(o.prefill + [64]), vocab)
            measure.time_decode(e, min(o.contexts + [64]), 4)
        except Exception as ex:
            # An engine or variant that fails here is reported and left out; the others
            # still run (a CUDA error that poisons the process fails them all in turn).
            res[e.name]["failed"] = f"{type(ex).__name__}: {ex}"[:500]
            log(f"{e.name}: warm-up failed, dropped: {res[e.name]['failed']}")
            engines.remove(e)
            continue
        res[e.name]["warmup_s"] = time.perf_counter() - t0
        log(f"{e.name}: warm-up {res[e.name]['warmup_s']:.1f} s")
    save()
    if not engines:
        raise RuntimeError("every engine failed its warm-up: " + "; ".join(
            f"{n}: {r['failed']}" for n, r in res.items() if "failed" in r))

    def guarded(label, e, fn):
        """Run one measurement unless time is up; a failure is recorded, not fatal."""
        if not time_left():
            return {"skipped": "time budget"}
        try:
            return fn()
        except Exception as ex:  # e.g. a variant that does not compile on this backend
            log(f"{e.name}: {label} failed: {type(ex).__name__}: {ex}")
            return {"skipped": f"error: {type(ex).__name__}: {ex}"[:300]}

    def prefill(n):
        # Long prompts: two runs, since the first pays for new shapes (one run of 4096 on an
        # H200 gave 2970 tok/s where 512 gave 6093 on its second run).
        for _ in range(o.repeats if n <= 1024 else min(o.repeats, 2)):
            for e in engines:
                if e.decode_only:
                    continue
                r = guarded(f"prefill {n}", e, lambda: measure.time_prefill(e, n, vocab))
                _keep_best(res[e.name]["prefill"], str(n), r, "tok_s")
                if "tok_s" in r:
                    log(f"{e.name}: prefill {n}: {r['tok_s']:.1f} tok/s ({r['seconds']:.2f} s)")
                save()

    def prefill_new(n):
        # Per engine, two prompt lengths no run has used (each engine its own): what a user's
        # new prompt costs, new shapes included (the repeats above hide that; on CUDA each new
        # attention shape once cost a cuDNN graph). The first one also pays one-time kernel
        # builds for its short last chunk (17 s on an H200 for 529 tokens, once per process;
        # MLX kernels are shared, so the engine that runs first pays for both); the second is
        # the steady cost of a new length.
        for i, e in enumerate(engines):
            if e.decode_only:
                continue
            for kind, m in (("prefill_first_new", n + 17 + 2 * i), ("prefill_new", n + 41 + 2 * i)):
                r = guarded(f"prefill {m} (new length)", e, lambda: measure.time_prefill(e, m, vocab))
                res[e.name].setdefault(kind, {})[str(n)] = r
                if "tok_s" in r:
                    log(f"{e.name}: prefill {m} (new length): {r['tok_s']:.1f} tok/s ({r['seconds']:.2f} s)")
                save()

    def decode(c):
        for _ in range(o.repeats):
            for e in engines:
                r = guarded(f"decode @{c}", e, lambda: measure.time_decode(e, c, o.decode_tokens))
                if "tok_s" in r:
                    r["gbps"] = res[e.name]["active_gb_per_token"] * r["tok_s"]
                    r["of_copy_bw"] = r["gbps"] / result["copy_gbps"]
                    log(f"{e.name}: decode @{c}: {r['ms_per_token']:.2f} ms/token "
                        f"({r['of_copy_bw']:.0%} of copy bandwidth)")
                _keep_best(res[e.name]["decode"], str(c), r, "tok_s")
                save()

    def analyse(c, tokens):
        for e in engines:
            if tokens == 1 and "graph" not in res[e.name]:
                res[e.name]["graph"] = guarded("graph", e, lambda: measure.decode_graph(e))
            if e.variant:  # the breakdown times the engine's own modules, not a variant's
                continue
            reps = o.breakdown_reps if tokens == 1 else max(2, o.breakdown_reps // 5)
            b = guarded(f"breakdown @{c}", e, lambda: breakdown(e, c, reps, tokens=tokens))
            if "rows" in b:
                res[e.name].setdefault("breakdown", []).append(b)
            save()

    # Cheapest and most telling first, so a time budget cuts the long prefills.
    for c in o.contexts:
        decode(c)
    for c in o.breakdown_contexts:
        analyse(c, 1)
    for n in sorted(o.prefill):
        prefill(n)
        prefill_new(n)
        if n in o.breakdown_prefill:
            analyse(n, n)
    for n in o.breakdown_prefill:
        if n not in o.prefill:
            analyse(n, n)
    result["ratios"] = ratios(result)
    result["total_s"] = time.perf_counter() - t_start
    save()
    if tmp is not None:
        tmp.cleanup()
    return result


def _keep_best(table: dict, key: str, r: dict, by: str):
    old = table.get(key)
    if by not in r:  # skipped or failed: keep an earlier good repeat if there is one
        table.setdefault(key, r)
        return
    runs = (old or {}).get("runs", []) + [r[by]]
    if old is None or by not in old or r[by] > old[by]:
        table[key] = dict(r)
    table[key]["runs"] = runs


def ratios(result: dict) -> dict:
    """Speed over mlx-lm's (and a variant's over mlxkt's), measurement by measurement."""
    res = result["engines"]
    out = {}
    for name, r in res.items():
        for base_name in ("mlx-lm", "mlxkt"):
            base = res.get(base_name)
            if base is None or name == base_name or (base_name == "mlxkt" and "+" not in name):
                continue
            cells = {}
            for kind in ("prefill", "prefill_new", "decode"):
                for k, v in r.get(kind, {}).items():
                    b = base.get(kind, {}).get(k, {})
                    if "tok_s" in v and "tok_s" in b:
                        cells[f"{kind.replace('_', ' ')} {k}"] = v["tok_s"] / b["tok_s"]
            out[f"{name} / {base_name}"] = cells
    return out
