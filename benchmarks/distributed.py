"""1 process vs expert-parallel (and pipeline) ranks on one machine: decode and prompt tok/s,
whether the tokens equal one process's, bytes each rank reads per decoded token, and the time
spent in all_sum per decoded token.

    python benchmarks/distributed.py [--backend ring|nccl] [--model DIR | --synthetic L,E]
        [--runs single:1,experts:2[:KEY=VALUE+...]] [--max-tokens 32] [--repeats 1] [--workdir W] [--json F]

Issue #8 on two GPUs (nvidia-h100-x2, MLX CUDA installed; one device call, ~5-7 minutes on a
fresh machine, most of it MLX's CUDA kernel compilation in the first process: once a first
process was stopped at 349 s still without output, and the next, on the filled cache, warmed
up in 68 s; --max-seconds keeps it inside the call's 10 minutes, the JSON is rewritten after
every run). A run may carry its own environment after a third colon, e.g.
whether MLX batches kernels into CUDA graphs (each NCCL call is captured into them):

    python3 -W ignore benchmarks/distributed.py --backend nccl --synthetic 8,32 \
        --runs single:1,experts:2,single:1:MLX_USE_CUDA_GRAPHS=0,experts:2:MLX_USE_CUDA_GRAPHS=0,experts:2:MLXKT_SPLIT_ATTENTION=0 \
        --max-tokens 32 --repeats 2 --max-seconds 540 --workdir /tmp/w8 --json $OUT/dist.json

Each run is fresh processes: `mode:1` one process (single: mlxkt.load; experts:1 the
expert-parallel code path on one rank), `mode:N` N local ranks through `mlxkt launch -n N
--backend B` (ring over 127.0.0.1, or nccl with one GPU per rank). In each process the
driver (mlxkt.distributed.run) loads the model, runs an untimed warm-up generation, then
--repeats timed greedy generations of --max-tokens (EOS ignored; speeds are their median).
A run that fails is reported with the end of its log (e.g. pipeline on nccl, which MLX's
NCCL backend cannot run: no send/recv). Before the first multi-rank run of a mode, a short
one-rank run of it fills MLX's kernel cache, so the ranks do not compile the same kernels
side by side.

Bytes per token: every weight a decode step touches on that rank (attention, norms, dense
MLPs, shared experts, head) plus the routed experts it ran (from rank 0's record of the
routing in experts mode, top-k per MoE layer otherwise). All-sum per token: rank 0 counts
the collectives of one decode step (a step message + one all_sum of the hidden state per
MoE layer in experts mode); every rank then times each kind of all_sum (200 iterations,
each evaluated, median); ms/token = sum of count x median. With ring on one CPU the ranks
share its cores and memory bandwidth: that shows overheads, not what two machines do.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_CONFIG = {  # DeepSeek-V3's structure at a size a CPU decodes in tens of ms
    "model_type": "deepseek_v3", "vocab_size": 320, "hidden_size": 1024, "intermediate_size": 2048,
    "moe_intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
    "num_key_value_heads": 8, "n_shared_experts": 1, "n_routed_experts": 64, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "kv_lora_rank": 256,
    "q_lora_rank": 384, "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1,
}
MODES = ("single", "experts", "pipeline")
WARMUP_RUN_TOKENS = 4
LOG_TAIL = 20  # lines of a failed run's log in the report


def parse_runs(text: str) -> list:
    """'single:1,experts:2:A=1+B=x' -> [('single', 1, {}), ('experts', 2, {'A': '1', 'B': 'x'})]:
    a run's own environment variables (for every process of that run) follow a third colon."""
    runs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        mode, _, rest = item.partition(":")
        n, _, envs = rest.partition(":")
        try:
            ranks = int(n or 1)
            env = dict(kv.split("=", 1) for kv in filter(None, envs.split("+")))
        except ValueError:
            ranks, env = 0, {}
        if mode not in MODES or ranks < 1 or (mode == "single" and ranks != 1):
            raise SystemExit(f"--runs: {item!r} is not one of single:1, experts:N, pipeline:N "
                             f"(optionally followed by :KEY=VALUE+KEY=VALUE)")
        runs.append((mode, ranks, env))
    return runs


def run_name(mode: str, ranks: int, env: dict) -> str:
    return " ".join([f"{mode}:{ranks}"] + [f"{k}={v}" for k, v in env.items()])


def build_model(out: Path) -> Path:
    """The small random V3-shaped model (the default: fast on a CPU)."""
    if (out / "config.json").exists():
        return out
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import random_model

    from mlxkt.distributed.run import write_model_dir

    return write_model_dir(random_model(BENCH_CONFIG, seed=0), BENCH_CONFIG, out, quantize=True)


def prepare_model(args, work: Path) -> Path:
    if args.model:
        return Path(args.model).expanduser()
    if args.synthetic:
        from mlxkt.bench.synth import slice_config, write_model_in_child

        layers, experts = (int(v) for v in args.synthetic.split(","))
        config = slice_config(args.preset, layers, experts)
        # a child process writes it: on MLX CUDA a process that writes then loads it crashes
        return write_model_in_child(work / f"{args.preset}-{layers}x{experts}", config, bits=4, group_size=64)
    return build_model(work / "model")


def model_facts(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "n_routed_experts", "num_local_experts",
            "num_experts_per_tok", "first_k_dense_replace", "vocab_size", "quantization")
    facts = {k: config[k] for k in keys if k in config}
    facts["weight_gb"] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9
    return facts


def child_env(extra: dict = None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **(extra or {})}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (shared hosts)
    return env


def run_process(argv: list, log: Path, timeout: float, env: dict = None) -> tuple:
    """-> (exit status, seconds); the whole process group is killed past `timeout`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(argv, cwd=REPO, env=child_env(env), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            f.write(f"\n[benchmark] killed after {timeout:g} s\n")
            rc = 124
    return rc, time.perf_counter() - t0


def tail(path: Path, n: int = LOG_TAIL) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def reason(log: str) -> str:
    """The last line of a failed run's log that says why (ranks' tracebacks interleave)."""
    marks = ("Error: ", "Exception: ", "mlxkt distributed [", "NCCL error", "[benchmark] killed")
    lines = log.splitlines()
    return next((ln.strip() for ln in reversed(lines) if any(m in ln for m in marks)),
                lines[-1].strip() if lines else "?")


def run_once(model_dir: Path, mode: str, ranks: int, args, out: Path, *, max_tokens: int,
             repeats: int, warmup_tokens: int, env: dict = None) -> dict:
    for old in [out, *out.parent.glob(out.name + ".rank*")]:
        old.unlink(missing_ok=True)
    driver = [sys.executable, "-m", "mlxkt.distributed.run", str(model_dir), "--mode", mode,
              "--out", str(out), "--scenarios", "generate,allsum", "--max-tokens", str(max_tokens),
              "--ignore-eos", "--repeats", str(repeats), "--warmup-tokens", str(warmup_tokens),
              "--logprobs", "token", "--pairs", "routing"]
    argv = driver if mode == "single" else [
        sys.executable, "-m", "mlxkt.distributed.cli", "-n", str(ranks), "--backend", args.backend,
        "--timeout", str(args.step_timeout), "--", *driver]
    log = out.with_suffix(".log")
    rc, seconds = run_process(argv, log, args.run_timeout, env)
    row = {"mode": mode, "ranks": ranks, "env": env or {}, "name": run_name(mode, ranks, env or {}),
           "seconds": seconds, "log": str(log)}
    if rc != 0 or not out.exists():
        log_tail = tail(log)
        return dict(row, ok=False, status=rc, reason=reason(log_tail), error=log_tail)
    try:
        return parse_run(row, out, ranks)
    except (OSError, KeyError, ValueError) as e:  # a rank exited 0 without its results
        return dict(row, ok=False, status=rc, reason=f"results unreadable: {e!r}", error=tail(log))


def parse_run(row: dict, out: Path, ranks: int) -> dict:
    r = json.loads(out.read_text())
    g = r["generate"]
    row.update(ok=True, load_seconds=r["load_seconds"], warmup_seconds=g.get("warmup_seconds"),
               decode_tps=g["generation_tps_median"], prompt_tps=g["prompt_tps_median"],
               decode_tps_runs=[x["generation_tps"] for x in g["runs"]], prompt_tokens=g["prompt_tokens"],
               tokens=g["tokens"], token_logprobs=g["token_logprobs"], repeats_identical=g["repeats_identical"],
               bytes_per_token_per_rank=rank_bytes(r, out, ranks),
               collectives_per_token=r.get("collectives_per_token"))
    if "allsum" in r:
        a = r["allsum"]
        row.update(allsum_ms_per_token=a["ms_per_token"], allsum_moe_ms_per_token=a["moe_ms_per_token"],
                   allsum_calls=a["calls"], allsum_timed=a["timed"], allsum_iterations=a["iterations"])
    return row


def rank_bytes(r: dict, out: Path, ranks: int) -> list:
    """Bytes per token on each rank: rank 0's own; the others' held bytes with the expert pairs
    rank 0 counted for them (experts mode) or their own count."""
    per_rank = [r["bytes"]["bytes_per_token"]]
    pairs = r.get("pairs_by_rank")
    for k in range(1, ranks):
        b = json.loads(Path(f"{out}.rank{k}").read_text())["bytes"]
        if pairs:
            per_rank.append(int(b["dense_bytes"] + pairs[k] * b["expert_bytes"]))
        else:
            per_rank.append(b["bytes_per_token"])
    return per_rank


def compare(rows: list) -> None:
    """Tokens and speed against the single-process run with the same environment, else the
    first single-process run that succeeded."""
    singles = [r for r in rows if r["ok"] and r["mode"] == "single"]
    for r in rows:
        base = next((b for b in singles if b["env"] == r["env"]), singles[0] if singles else None)
        if not r["ok"] or base is None:
            continue
        r["compared_with"] = base["name"]
        r["identical_to_single"] = r["tokens"] == base["tokens"]
        same = [a == b for a, b in zip(r["tokens"], base["tokens"])] + [False]
        n = same.index(False)  # the tokens agree up to here: compare their log-probabilities
        r["first_difference"] = None if r["identical_to_single"] else n
        r["max_logprob_diff_vs_single"] = max((abs(a - b) for a, b in zip(r["token_logprobs"][:n],
                                                                          base["token_logprobs"][:n])), default=0.0)
        r["speedup_vs_single"] = r["decode_tps"] / base["decode_tps"]
        r["prompt_speedup_vs_single"] = r["prompt_tps"] / base["prompt_tps"]
        if r.get("allsum_ms_per_token") is not None:
            r["allsum_share_of_decode"] = r["allsum_ms_per_token"] / (1e3 / r["decode_tps"])


def warmup_mode(mode: str) -> str:
    return "experts" if mode == "experts" else "single"  # pipeline runs single's kernels


def print_table(report: dict) -> None:
    print(f"\n{report['machine'].get('gpu') or report['machine'].get('cpu')}, MLX {report['machine']['mlx']}, "
          f"backend {report['backend']}, model {report['model']}")
    width = max([11] + [len(r["name"]) + 1 for r in report["rows"]])
    print(f"{'run':<{width}}{'decode tok/s':>13}{'x single':>9}{'prompt tok/s':>13}{'same tokens':>12}"
          f"{'all_sum ms/tok':>15}{'calls/tok':>10}   MiB/token per rank")
    for r in report["rows"]:
        name = r["name"]
        if not r["ok"]:
            what = "SKIPPED" if r["status"] is None else f"FAILED (status {r['status']})"
            print(f"{name:<{width}}{what}: {r['reason'][:160]}")
            continue
        calls = sum(c["count"] for c in r.get("collectives_per_token") or [] if c["op"] == "all_sum")
        ms = r.get("allsum_ms_per_token")
        same = {True: "yes", False: f"NO@{r.get('first_difference')}", None: "-"}[r.get("identical_to_single")]
        mib = ", ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_token_per_rank"])
        print(f"{name:<{width}}{r['decode_tps']:>13.2f}{r.get('speedup_vs_single', float('nan')):>9.2f}"
              f"{r['prompt_tps']:>13.1f}{same:>12}{'-' if ms is None else f'{ms:.3f}':>15}"
              f"{calls if r['ranks'] > 1 or calls else '-':>10}   {mib}")
    for r in report["rows"]:
        for c in r.get("allsum_calls") or []:
            print(f"  {r['name']} all_sum {c['dtype']}{c['shape']} x{c['count']}/token: "
                  f"{c['median_us']:.1f} us median")


def main(argv=None):
    ap = argparse.ArgumentParser(description="1 process vs local ranks: tok/s, tokens, bytes, all_sum time")
    ap.add_argument("--backend", choices=["ring", "nccl"], default="ring",
                    help="ranks' backend: ring (TCP on 127.0.0.1) or nccl (one GPU per rank)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a converted model directory")
    src.add_argument("--synthetic", default=None, metavar="LAYERS,EXPERTS",
                     help="a random DeepSeek-V3 slice at real widths (mlxkt.bench.synth), written to --workdir")
    ap.add_argument("--preset", choices=["dsv3", "tiny"], default="dsv3", help="--synthetic widths (tiny: tests)")
    ap.add_argument("--runs", default="single:1,experts:2",
                    help="mode:ranks[:KEY=VALUE+...], e.g. single:1,experts:2,"
                         "single:1:MLX_USE_CUDA_GRAPHS=0,experts:2:MLX_USE_CUDA_GRAPHS=0")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed generations per process (median)")
    ap.add_argument("--warmup-tokens", type=int, default=8, help="untimed generation in each process first")
    ap.add_argument("--no-warmup-runs", action="store_true",
                    help="no one-rank run before a mode's first multi-rank run")
    ap.add_argument("--run-timeout", type=float, default=420, help="seconds one run (all its processes) may take")
    ap.add_argument("--step-timeout", type=float, default=300,
                    help="MLXKT_DIST_TIMEOUT of the ranks (a first step may compile kernels)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop starting runs past this many seconds (the rest are reported as skipped)")
    ap.add_argument("--workdir", default=None, help="keep the model and logs here")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    runs = parse_runs(args.runs)
    tmp = tempfile.TemporaryDirectory(prefix="mlxkt-dist-bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = prepare_model(args, work)
    report = {"backend": args.backend, "model": str(model_dir), "model_facts": model_facts(model_dir),
              "prepare_seconds": time.perf_counter() - t0, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "warmups": [], "rows": [], "complete": False}

    def run(mode, ranks, out, env=None, **kw):
        left = args.max_seconds - (time.perf_counter() - t0) if args.max_seconds else args.run_timeout
        if left < 30:
            return {"mode": mode, "ranks": ranks, "env": env or {}, "name": run_name(mode, ranks, env or {}),
                    "ok": False, "status": None, "reason": "--max-seconds reached", "error": ""}
        args_run = argparse.Namespace(**{**vars(args), "run_timeout": min(args.run_timeout, left)})
        return run_once(model_dir, mode, ranks, args_run, out, env=env, **kw)

    warm = set()
    for i, (mode, ranks, env) in enumerate(runs):
        if ranks > 1 and not args.no_warmup_runs and warmup_mode(mode) not in warm:
            w = run(warmup_mode(mode), 1, work / f"warmup-{warmup_mode(mode)}.json",
                    max_tokens=WARMUP_RUN_TOKENS, repeats=1, warmup_tokens=0)
            report["warmups"].append({k: w.get(k) for k in ("mode", "ranks", "ok", "seconds", "reason")})
            warm.add(warmup_mode(mode))
        row = run(mode, ranks, work / (f"{mode}{ranks}.json" if not env else f"{mode}{ranks}-{i}.json"),
                  env, max_tokens=args.max_tokens, repeats=args.repeats, warmup_tokens=args.warmup_tokens)
        report["rows"].append(row)
        if ranks == 1 and row["ok"]:
            warm.add(warmup_mode(mode))
        if args.json:  # so far: a call cut short still leaves the runs that finished
            Path(args.json).write_text(json.dumps(report, indent=1))
    compare(report["rows"])
    from mlxkt.bench.runner import machine_info

    report.update(machine=machine_info(), total_seconds=time.perf_counter() - t0, complete=True)
    print(json.dumps(report))
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    tmp.cleanup()
    return report

if __name__ == "__main__":
    main()
