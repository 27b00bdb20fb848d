"""What /v1/models, /api/tags and /api/show say about the loaded model (read once at start)."""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class ModelInfo:
    name: str
    model_type: str = "unknown"
    parameters: int = 0
    size_bytes: int = 0
    quantization: str = "unknown"
    vocab_size: int = 0
    context_length: int = 4096
    modified_at: float = field(default_factory=time.time)
    digest: str = ""
    config: dict = field(default_factory=dict)

    @property
    def parameter_size(self) -> str:
        n = self.parameters
        for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                return f"{n / scale:.1f}{unit}"
        return str(n)


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def context_length_of(config: dict, tokenizer, override: Optional[int]) -> int:
    """--context-length, else the config's max_position_embeddings, else the tokenizer's."""
    if override:
        return int(override)
    for source in (config, config.get("text_config", {})):
        n = source.get("max_position_embeddings")
        if isinstance(n, int) and n > 0:
            return n
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 10_000_000:
        return n
    return 4096


def _count_parameters(model, bits: int) -> int:
    from mlx.utils import tree_flatten

    total = 0
    for name, a in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")):
            continue  # affine-quantization side tensors, not model parameters
        # a packed quantized weight holds 32 // bits values per uint32
        total += a.size * 32 // bits if "uint32" in str(a.dtype) else a.size
    return total


def describe(model, tokenizer, path: Path, name: str, context_length: int) -> ModelInfo:
    config = read_config(path)
    quant = config.get("quantization") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    modified = max((f.stat().st_mtime for f in files), default=time.time())
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    vocab = config.get("vocab_size") or len(tokenizer.get_vocab())
    return ModelInfo(
        name=name,
        model_type=str(config.get("model_type", "unknown")),
        parameters=_count_parameters(model, bits or 4),
        size_bytes=size,
        quantization=f"{bits}-bit" if bits else str((config.get("mlxkt") or {}).get("dtype")
                                                    or config.get("torch_dtype", "unknown")),
        vocab_size=int(vocab),
        context_length=context_length,
        modified_at=modified,
        digest=digest,
        config=config,
    )
