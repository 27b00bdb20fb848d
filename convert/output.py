"""The non-weight outputs: config.json (with `quantization` and mlxkt metadata), the index,
and the tokenizer / chat template / generation files copied from the source."""

import json
import shutil
from pathlib import Path

from .plan import Plan

FORMAT_VERSION = 1
SHARD_METADATA = {"format": "mlx"}
COPY_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "tiktoken.model",
)
COPY_GLOBS = ("*.tiktoken",)


def output_config(config: dict, plan: Plan, source: str) -> dict:
    o = plan.options
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "quantization")}
    if o.quantize:
        default = {"group_size": o.group_size, "bits": o.bits}
        q = dict(default)
        for module, params in sorted(plan.overrides.items()):
            if params != default:
                q[module] = params  # False: kept unquantized; dict: other bits
        cfg["quantization"] = q
        cfg["quantization_config"] = dict(q)  # as mlx-lm writes it (HF model tree)
    cfg["mlxkt"] = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "recipe": o.recipe if o.quantize else None,
        "bits": o.bits if o.quantize else None,
        "group_size": o.group_size if o.quantize else None,
        "dtype": o.dtype,
        "bits_per_weight": round(plan.bits_per_weight, 4),
        "mtp_file": "mtp.safetensors" if len(plan.shards) > len(plan.main_shards) else None,
    }
    return cfg


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def write_outputs(tmp: Path, src: Path, config: dict, plan: Plan, source: str) -> None:
    weight_map = {t.name: s.filename for s in plan.main_shards for t in s.tensors}
    index = {
        "metadata": {"total_size": plan.main_bytes, "total_parameters": plan.main_params},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(tmp / "model.safetensors.index.json", index)
    write_json(tmp / "config.json", output_config(config, plan, source))
    names = [n for n in COPY_FILES if (src / n).is_file()]
    names += [p.name for g in COPY_GLOBS for p in sorted(src.glob(g))]
    for n in names:
        shutil.copyfile(src / n, tmp / n)
