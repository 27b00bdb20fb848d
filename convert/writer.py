"""Streaming safetensors writer: header first (all offsets known from the plan), then each
tensor's bytes written into place as they are produced, a row range at a time.

Rows of one tensor must arrive in order (expert slots and row chunks are produced in order),
so each tensor's SHA-256 is computed on the fly; `--resume` re-checks finished shards with it.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

from .plan import OutTensor
from .source import ITEMSIZE

HASH_CHUNK = 64 * 2**20


def layout(tensors: List[OutTensor], metadata: Dict[str, str]) -> Tuple[bytes, Dict[str, int]]:
    """-> (8-byte length + padded JSON header, tensor name -> offset of its data in the file)."""
    header, offsets, pos = {"__metadata__": metadata}, {}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = pos
        pos += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    head = len(blob).to_bytes(8, "little") + blob
    return head, {k: v + len(head) for k, v in offsets.items()}


class ShardWriter:
    def __init__(self, path: Path, tensors: List[OutTensor], metadata: Dict[str, str]):
        self.path = Path(path)
        head, self.offsets = layout(tensors, metadata)
        self.tensors = {t.name: t for t in tensors}
        self.size = len(head) + sum(t.nbytes for t in tensors)
        self.next_byte = {t.name: 0 for t in tensors}
        self.hashes = {t.name: hashlib.sha256() for t in tensors}
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, head, 0)
        os.ftruncate(self.fd, self.size)

    def write(self, name: str, row0: int, data) -> None:
        """Write rows starting at row0 of tensor `name` (data: C-contiguous buffer)."""
        t = self.tensors[name]
        mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
        start = row0 * t.shape[-1] * ITEMSIZE[t.dtype] if t.shape else 0
        if start != self.next_byte[name] or start + len(mv) > t.nbytes:
            raise RuntimeError(f"{self.path.name}: {name}: out-of-order write at byte {start}")
        pos, done = self.offsets[name] + start, 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], pos + done)
        self.next_byte[name] = start + len(mv)
        self.hashes[name].update(mv)

    def finish(self) -> Dict:
        incomplete = [n for n, t in self.tensors.items() if self.next_byte[n] != t.nbytes]
        if incomplete:
            raise RuntimeError(f"{self.path.name}: tensors not fully written: {incomplete[:3]}")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        return {"size": self.size, "sha256": {n: h.hexdigest() for n, h in self.hashes.items()}}

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def verify(path: Path, tensors: List[OutTensor], metadata: Dict[str, str], record: Dict) -> bool:
    """True if `path` is exactly the shard the plan describes, with the recorded tensor hashes."""
    path = Path(path)
    head, offsets = layout(tensors, metadata)
    try:
        if path.stat().st_size != record.get("size"):
            return False
        with open(path, "rb", buffering=0) as f:
            if f.read(len(head)) != head:
                return False
            for t in tensors:
                h, left = hashlib.sha256(), t.nbytes
                f.seek(offsets[t.name])
                while left:
                    block = f.read(min(left, HASH_CHUNK))
                    if not block:
                        return False
                    h.update(block)
                    left -= len(block)
                if h.hexdigest() != record["sha256"].get(t.name):
                    return False
    except (OSError, KeyError, TypeError):
        return False
    return True
