"""Checks on a source checkpoint before any work: config, model type, no pickles, no code."""

import json
from pathlib import Path

from .errors import ConvertError
from .rules import MODEL_RULES

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REQUIRED_KEYS = {
    "deepseek_v3": ("num_hidden_layers", "num_attention_heads", "hidden_size", "kv_lora_rank",
                    "qk_nope_head_dim", "v_head_dim", "n_routed_experts"),
    "deepseek_v2": ("num_hidden_layers", "num_attention_heads", "hidden_size", "kv_lora_rank",
                    "qk_nope_head_dim", "v_head_dim"),
    "mixtral": ("num_hidden_layers", "num_attention_heads", "hidden_size", "num_local_experts"),
}
REQUIRED_KEYS["kimi_k2"] = REQUIRED_KEYS["deepseek_v3"]


def read_config(src: Path) -> dict:
    f = Path(src) / "config.json"
    if not f.is_file():
        raise ConvertError(f"{f}: missing; is {src} a model directory?")
    try:
        config = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{f}: not a JSON object")
    if "quantization" in config:
        raise ConvertError(f"{f}: already an MLX conversion (has 'quantization'); convert the original")
    mt = config.get("model_type")
    if mt not in MODEL_RULES:
        raise ConvertError(
            f"{f}: model_type {mt!r} is not supported (supported: {', '.join(sorted(MODEL_RULES))})"
        )
    for k in REQUIRED_KEYS[mt]:
        if not isinstance(config.get(k), int) or isinstance(config.get(k), bool) or config[k] <= 0:
            raise ConvertError(f"{f}: {k} missing or not a positive integer")
    qc = config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method != "fp8":
            raise ConvertError(f"{f}: quantization_config quant_method {method!r} is not supported (only fp8)")
        block = qc.get("weight_block_size", [128, 128])
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConvertError(f"{f}: bad weight_block_size {block!r}")
    if "model_file" in config:
        # mlx-lm would import and run this file when loading the output.
        raise ConvertError(f"{f}: asks to run custom code (model_file {config['model_file']!r}); refused")
    return config


def check_files(src: Path) -> None:
    """No pickle-format weights (loading them can run code); remote code is never copied."""
    for p in sorted(Path(src).iterdir()):
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise ConvertError(f"{p}: pickle file in the source; only safetensors are accepted (remove it)")
