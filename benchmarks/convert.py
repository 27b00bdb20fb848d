"""Converter benchmark: peak RSS and throughput of `mlxkt convert` vs `mlx_lm convert` on the
same synthetic FP8 DeepSeek-V3-layout checkpoint, each run in its own child process.

    python benchmarks/convert.py --sizes 1 8 --mlx-lm-max-gb 4 --out results.json

Prints JSON (to --out and stdout) plus a table. Peak RSS is the child's ru_maxrss (os.wait4);
MB/s is source bytes / wall time. The checkpoint has no MTP layer so that mlx-lm (which drops
only layer 61) can load it. Data is random FP8 (no NaN codes) with random block scales.
"""

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 32000,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 1024,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "first_k_dense_replace": 1, "max_position_embeddings": 4096,
    "norm_topk_prob": True, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "num_nextn_predict_layers": 0,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "moe_layer_freq": 1, "attention_bias": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
SHARD_BYTES = 2 * 2**30


def shapes(c):
    D, H, V, E, mi = c["hidden_size"], c["num_attention_heads"], c["vocab_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    nope, rope, v, r, q = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"], c["q_lora_rank"]
    s = {"model.embed_tokens.weight": ((V, D), "BF16")}
    for i in range(c["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        s.update({p + "input_layernorm.weight": ((D,), "BF16"), p + "post_attention_layernorm.weight": ((D,), "BF16"),
                  a + "q_a_proj.weight": ((q, D), "F8"), a + "q_a_layernorm.weight": ((q,), "BF16"),
                  a + "q_b_proj.weight": ((H * (nope + rope), q), "F8"),
                  a + "kv_a_proj_with_mqa.weight": ((r + rope, D), "F8"), a + "kv_a_layernorm.weight": ((r,), "BF16"),
                  a + "kv_b_proj.weight": ((H * (nope + v), r), "F8"), a + "o_proj.weight": ((D, H * v), "F8")})
        if i < c["first_k_dense_replace"]:
            I = c["intermediate_size"]
            s.update({p + "mlp.gate_proj.weight": ((I, D), "F8"), p + "mlp.up_proj.weight": ((I, D), "F8"),
                      p + "mlp.down_proj.weight": ((D, I), "F8")})
            continue
        s.update({p + "mlp.gate.weight": ((E, D), "BF16"), p + "mlp.gate.e_score_correction_bias": ((E,), "F32")})
        for e in ["shared_experts"] + [f"experts.{j}" for j in range(E)]:
            s.update({f"{p}mlp.{e}.gate_proj.weight": ((mi, D), "F8"), f"{p}mlp.{e}.up_proj.weight": ((mi, D), "F8"),
                      f"{p}mlp.{e}.down_proj.weight": ((D, mi), "F8")})
    s.update({"model.norm.weight": ((D,), "BF16"), "lm_head.weight": ((V, D), "BF16")})
    return s


def entries(c):
    """(name, dtype, shape) in file order, FP8 weights followed by their scale_inv."""
    for name, (shape, kind) in shapes(c).items():
        if kind == "F8":
            yield name, "F8_E4M3", shape
            yield name + "_scale_inv", "F32", tuple(-(-d // 128) for d in shape)
        else:
            yield name, kind, shape


ITEM = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def write_checkpoint(path: Path, c: dict) -> int:
    """Write shards of <= SHARD_BYTES streaming from a reused random pool; returns bytes."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, 64 * 2**20, dtype=np.uint8)
    pool[(pool & 0x7F) == 0x7F] = 0x38  # no NaN codes
    bf16 = (rng.standard_normal(32 * 2**20, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    bf16 = bf16.astype(np.uint16).view(np.uint8)
    scales = (rng.random(2**20, dtype=np.float32) * 1e-3 + 1e-4).view(np.uint8)
    shards, cur, size = [], [], 0
    for name, dtype, shape in entries(c):
        n = math.prod(shape) * ITEM[dtype]
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, dtype, shape, n))
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {}, 0
        for name, dtype, shape, n in shard:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, dtype, shape, n in shard:
                src = {"F8_E4M3": pool, "BF16": bf16, "F32": scales}[dtype]
                left = n
                while left:
                    k = min(left, len(src) // 2)
                    off = int(rng.integers(0, len(src) - k + 1)) & ~3
                    f.write(src[off:off + k].tobytes())
                    left -= k
        total += pos
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(c, indent=1))
    write_tokenizer(path, c["vocab_size"])
    return total


def write_tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1"}))


def config_for(gb: float) -> dict:
    """Scale routed experts and layers so the checkpoint is about `gb` GB."""
    c = dict(BASE)
    per_expert = 3 * c["moe_intermediate_size"] * c["hidden_size"]  # FP8 bytes
    c["n_routed_experts"] = 64
    layers = max(2, round(gb * 1e9 / (64 * per_expert + 40e6)) + 1)
    c["num_hidden_layers"] = layers
    return c


def run_child(cmd, env=None) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    # ru_maxrss: kilobytes on Linux, bytes on macOS.
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"exit_code": code, "wall_s": round(wall, 2), "peak_rss_mb": round(rss / 2**20, 1),
            "error": err.strip().splitlines()[-1][:300] if code and err.strip() else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 8], help="checkpoint sizes in GB")
    ap.add_argument("--mlx-lm-max-gb", type=float, default=4,
                    help="skip mlx_lm convert above this size (it holds the model in memory)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mlxkt-convert-bench-"))
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}" + os.environ.get("PYTHONPATH", ""))
    mlxkt_cmd = [sys.executable, "-c",
                 "import sys, mlxkt\n"
                 "try:\n import mlxkt.convert\nexcept ImportError:\n mlxkt.__path__.append(sys.argv[3])\n"
                 "from mlxkt.convert import convert\nconvert(sys.argv[1], sys.argv[2], progress=False)"]
    results = []
    for gb in args.sizes:
        c = config_for(gb)
        src = work / f"src-{gb:g}gb"
        if not src.exists():
            print(f"writing a {gb:g} GB synthetic FP8 checkpoint to {src} ...", file=sys.stderr)
            write_checkpoint(src, c)
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        row = {"size_gb": round(src_bytes / 1e9, 2), "layers": c["num_hidden_layers"],
               "experts": c["n_routed_experts"]}
        for tool, cmd in (
            ("mlxkt", mlxkt_cmd + [str(src), str(work / "out-mlxkt"), str(REPO)]),
            ("mlx_lm", [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                        "--mlx-path", str(work / "out-mlx_lm"), "-q", "--q-bits", "4",
                        "--q-group-size", "64"]),
        ):
            out = work / f"out-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "mlx_lm" and gb > args.mlx_lm_max_gb:
                row[tool] = {"skipped": f"> --mlx-lm-max-gb {args.mlx_lm_max_gb:g}"}
                continue
            print(f"{tool} on {gb:g} GB ...", file=sys.stderr)
            r = run_child(cmd, env)
            if r["exit_code"] == 0:
                r["mb_per_s"] = round(src_bytes / 1e6 / r["wall_s"], 1)
                r["out_gb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 3)
            row[tool] = r
            shutil.rmtree(out, ignore_errors=True)
        results.append(row)
    doc = {"benchmark": "convert", "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
           "source": "synthetic FP8 DeepSeek-V3 layout (hidden 2048, 64 experts x 1024)", "results": results}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"\n{'size GB':>8} | {'tool':<7} | {'peak RSS MB':>11} | {'MB/s':>7} | {'wall s':>7}")
    print("-" * 52)
    for row in results:
        for tool in ("mlxkt", "mlx_lm"):
            r = row[tool]
            if "skipped" in r:
                print(f"{row['size_gb']:>8} | {tool:<7} | {'skipped':>11} | {'':>7} | {'':>7}")
            elif r["exit_code"]:
                print(f"{row['size_gb']:>8} | {tool:<7} | {r['peak_rss_mb']:>11} | {'failed':>7} | {r['wall_s']:>7}")
            else:
                print(f"{row['size_gb']:>8} | {tool:<7} | {r['peak_rss_mb']:>11} | {r['mb_per_s']:>7} | {r['wall_s']:>7}")


if __name__ == "__main__":
    main()
