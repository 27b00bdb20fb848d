"""Source checkpoints: safetensors headers parsed and checked by hand, tensor rows read on demand.

We parse the 8-byte length + JSON header ourselves (the `safetensors` package cannot hand F8
tensors to numpy) and read row ranges with plain positioned reads into fresh buffers. No mmap:
mapped pages would count toward the resident set and grow it with the model size.
"""

import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import ConvertError

MAX_HEADER_BYTES = 100 * 2**20

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# How the raw bytes of each float dtype are viewed in numpy before decoding.
RAW_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """Parse and sanity-check one safetensors file's header; never reads tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConvertError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise ConvertError(
                    f"{path}: header length {n} is larger than the limit or the file"
                )
            blob = f.read(n)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(blob, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    out = {}
    spans = []
    for name, entry in header.items():
        info = _check_entry(path, name, entry, data_start, size)
        out[name] = info
        if info.nbytes:
            spans.append((info.start, info.start + info.nbytes, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ConvertError(f"{path}: tensors {n0} and {n1} overlap in the file")
    return out


def _check_entry(path, name, entry, data_start, size) -> TensorInfo:
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise ConvertError(f"{where}: header entry is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise ConvertError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ConvertError(f"{where}: bad shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise ConvertError(f"{where}: bad data_offsets {offs!r}")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if offs[1] - offs[0] != nbytes:
        raise ConvertError(
            f"{where}: shape {shape} {dtype} needs {nbytes} bytes, offsets give {offs[1] - offs[0]}"
        )
    if data_start + offs[1] > size:
        raise ConvertError(f"{where}: data ends past the end of the file (truncated?)")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offs[0], nbytes)


def load_tensors(src: Path) -> Dict[str, TensorInfo]:
    """All tensors of a checkpoint directory, checked against its index when there is one."""
    src = Path(src)
    index_file = src / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ConvertError(f"{index_file}: not a valid index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        for fname in files:
            if not isinstance(fname, str) or "/" in fname or fname.startswith("."):
                raise ConvertError(f"{index_file}: bad shard name {fname!r}")
            if not (src / fname).is_file():
                name = next(k for k, v in weight_map.items() if v == fname)
                raise ConvertError(f"{src / fname}: shard named in the index is missing (tensor {name})")
    else:
        files = sorted(p.name for p in src.glob("*.safetensors") if not p.name.startswith("mtp"))
        weight_map = None
        if not files:
            raise ConvertError(f"{src}: no *.safetensors weights found")
    tensors: Dict[str, TensorInfo] = {}
    for fname in files:
        for name, info in read_header(src / fname).items():
            if name in tensors:
                raise ConvertError(
                    f"{src / fname}: tensor {name} is also in {tensors[name].file.name}"
                )
            tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise ConvertError(f"{src / fname}: tensor {name} named in the index is not in the file")
            if tensors[name].file.name != fname:
                raise ConvertError(
                    f"{tensors[name].file}: tensor {name} is indexed under {fname}"
                )
        for name, info in tensors.items():
            if name not in weight_map:
                raise ConvertError(f"{info.file}: tensor {name} is not in the index")
    return tensors


class Reader:
    """Positioned reads of row ranges; keeps one open descriptor per source file."""

    def __init__(self):
        self._files: Dict[Path, "io.FileIO"] = {}

    def _file(self, path: Path):
        if path not in self._files:
            self._files[path] = open(path, "rb", buffering=0)
        return self._files[path]

    def rows(self, t: TensorInfo, r0: int = 0, r1: Optional[int] = None) -> np.ndarray:
        """Rows [r0, r1) of t as raw numpy ([n, cols]; bf16 as uint16, F8 as uint8)."""
        r1 = t.rows if r1 is None else r1
        if t.dtype not in RAW_NUMPY:
            raise ConvertError(f"{t.file}: tensor {t.name}: unsupported dtype {t.dtype}")
        item = ITEMSIZE[t.dtype]
        row_bytes = t.cols * item
        buf = np.empty((r1 - r0) * row_bytes, dtype=np.uint8)
        f, view = self._file(t.file), memoryview(buf)
        f.seek(t.start + r0 * row_bytes)
        done = 0
        while done < len(buf):
            n = f.readinto(view[done:])
            if not n:
                raise ConvertError(f"{t.file}: tensor {t.name}: file ended early")
            done += n
        return buf.view(RAW_NUMPY[t.dtype]).reshape(r1 - r0, t.cols)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
