"""`mlxkt info`: size, bits per weight and KV-cache cost of a converted model, without loading it."""

import json
from pathlib import Path

import numpy as np

from .config import ModelArgs
from .safetensors_header import read_header

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "I32": 4, "F8_E4M3": 1}


def _quant_for(module: str, quantization: dict):
    q = quantization.get(module, quantization)
    return q if isinstance(q, dict) else None


def model_info(path) -> dict:
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    args = ModelArgs.from_dict(config)
    quantization = config.get("quantization") or {}
    params = nbytes = 0
    files = sorted(path.glob("model*.safetensors")) + sorted(path.glob("mtp.safetensors"))
    mtp_bytes = 0
    for f in files:
        for name, t in read_header(f).items():
            n = int(np.prod(t["shape"])) if t["shape"] else 1
            b = n * DTYPE_BYTES.get(t["dtype"], 2)
            if f.name == "mtp.safetensors":
                mtp_bytes += b
                continue
            nbytes += b
            if name.endswith((".scales", ".biases")):
                continue
            q = _quant_for(name.rsplit(".", 1)[0], quantization)
            if t["dtype"] == "U32" and q:
                n = n * 32 // q["bits"]
            params += n
    if args.model_type == "mixtral":
        kv_per_token = 2 * args.num_key_value_heads * args.head_dim
    else:  # MLA: only the latent and the shared rope key are cached
        kv_per_token = args.kv_lora_rank + args.qk_rope_head_dim
    act_bytes = 4 if _on_cpu() else 2
    return {
        "model_type": args.model_type,
        "layers": args.num_hidden_layers,
        "parameters": params,
        "bytes": nbytes,
        "mtp_bytes": mtp_bytes,
        "bits_per_weight": 8 * nbytes / max(params, 1),
        "kv_bytes_per_token": kv_per_token * args.num_hidden_layers * act_bytes,
        "quantization": {k: quantization[k] for k in ("bits", "group_size") if k in quantization},
    }


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def format_info(info: dict, memory: int) -> str:
    gib = 2**30
    kv = info["kv_bytes_per_token"]
    free = memory - info["bytes"] - info["mtp_bytes"]
    ctx = max(free, 0) // kv if kv else 0
    fits = "yes" if free > 0 else "no"
    lines = [
        f"model type        {info['model_type']} ({info['layers']} layers)",
        f"parameters        {info['parameters'] / 1e9:.3f} B",
        f"weights           {info['bytes'] / gib:.2f} GiB"
        + (f" (+ {info['mtp_bytes'] / gib:.2f} GiB MTP)" if info["mtp_bytes"] else ""),
        f"bits per weight   {info['bits_per_weight']:.3f}",
        f"KV cache          {kv / 1024:.1f} KiB per token",
        f"this machine      {memory / gib:.1f} GiB usable; fits: {fits}"
        + (f", room for ~{ctx:,} tokens of context" if free > 0 else ""),
    ]
    return "\n".join(lines)
