"""1 process vs 2 local ranks: decode tok/s, prompt tok/s, and weight bytes read per decoded
token on each rank, on a random DeepSeek-V3-shaped model (4-bit) saved to --workdir.

    python benchmarks/distributed.py [--max-tokens 32] [--repeats 1] [--json out.json]

Runs, each as fresh processes (2 ranks through `mlxkt launch -n 2`, ring over 127.0.0.1):
single (mlxkt.load), experts x1 (the expert-parallel code path on one rank), experts x2,
pipeline x2. Bytes per token: every weight a decode step touches on that rank (attention,
norms, dense MLPs, shared experts, head) plus the routed experts it ran, measured from the
routing (experts modes) or top-k per MoE layer (whole experts held). Two ranks on one
machine share its cores and memory bandwidth: this shows the bytes each rank reads and the
overheads, not what two Macs would do.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
RUNS = [("single", 1), ("experts", 1), ("experts", 2), ("pipeline", 2)]


def build_model(out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import random_model

    from mlxkt.distributed.run import write_model_dir

    return write_model_dir(random_model(BENCH_CONFIG, seed=0), BENCH_CONFIG, out, quantize=True)


def run_once(model_dir: Path, mode: str, ranks: int, max_tokens: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore"}
    driver = [sys.executable, "-m", "mlxkt.distributed.run", str(model_dir), "--mode", mode, "--out", str(out),
              "--scenarios", "generate", "--max-tokens", str(max_tokens), "--ignore-eos"]
    argv = driver if mode == "single" else [sys.executable, "-m", "mlxkt.distributed.cli", "-n", str(ranks), "--", *driver]
    subprocess.run(argv, check=True, cwd=REPO, env=env, timeout=600, stderr=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    per_rank = [r["bytes"]["bytes_per_token"]]
    for k in range(1, ranks):
        per_rank.append(json.loads(Path(f"{out}.rank{k}").read_text())["bytes"]["bytes_per_token"])
    g = r["generate"]
    return {"mode": mode, "ranks": ranks, "decode_tps": g["generation_tps"], "prompt_tps": g["prompt_tps"],
            "prompt_tokens": g["prompt_tokens"], "tokens": len(g["tokens"]),
            "bytes_per_token_per_rank": per_rank}


def main():
    ap = argparse.ArgumentParser(description="1 vs 2 local ranks (ring over 127.0.0.1)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting; the median is reported")
    ap.add_argument("--workdir", default=None, help="keep the model here (built once)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="mlxkt-dist-bench-")
    work = Path(args.workdir or tmp.name)
    model_dir = build_model(work / "model")
    rows = []
    for mode, ranks in RUNS:
        runs = [run_once(model_dir, mode, ranks, args.max_tokens, work / f"{mode}{ranks}-{i}.json")
                for i in range(args.repeats)]
        row = dict(runs[0])
        for key in ("decode_tps", "prompt_tps"):
            row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
    import platform

    import mlx.core as mx

    report = {"device": f"{platform.machine()} {os.cpu_count()} cores, MLX {mx.__version__} "
                        f"{mx.default_device()}", "config": BENCH_CONFIG, "rows": rows}
    print(json.dumps(report))
    base = rows[0]
    print(f"\n{'mode':<10}{'ranks':>6}{'decode tok/s':>14}{'prompt tok/s':>14}   bytes/token per rank (MiB)")
    for r in rows:
        mib = ", ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_token_per_rank"])
        print(f"{r['mode']:<10}{r['ranks']:>6}{r['decode_tps']:>14.2f}{r['prompt_tps']:>14.1f}   {mib}"
              f"  (x{r['decode_tps'] / base['decode_tps']:.2f} decode vs single)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
