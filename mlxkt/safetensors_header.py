"""Read a safetensors header (tensor names, dtypes, shapes) without loading any data."""

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header of {n} bytes is too large")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def tensor_names(model_dir: Path, pattern: str = "model*.safetensors") -> list:
    names = []
    for f in sorted(Path(model_dir).glob(pattern)):
        names.extend(read_header(f))
    return names
