"""Who holds what: bytes per layer from the safetensors headers, layer ranges for pipeline mode,
expert ranges for expert mode. Pure Python (no MLX), so it is cheap to test and to print.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..safetensors_header import read_header

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class TensorEntry:
    file: Path
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def weight_index(model_dir: Path) -> Dict[str, TensorEntry]:
    """name -> where its bytes are, for the model*.safetensors files (MTP files excluded)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("model*.safetensors"))
    out = {}
    for fname in files:
        path = model_dir / fname
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        for name, meta in read_header(path).items():
            a, b = meta["data_offsets"]
            out[name] = TensorEntry(path, meta["dtype"], tuple(meta["shape"]), 8 + header_len + a, b - a)
    return out


def layer_of(name: str) -> Optional[int]:
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def layer_bytes(index: Dict[str, TensorEntry], num_layers: int) -> Tuple[List[int], int]:
    """(bytes of each decoder layer, bytes outside the layers: embeddings, final norm, head)."""
    per_layer, other = [0] * num_layers, 0
    for name, t in index.items():
        i = layer_of(name)
        if i is None:
            other += t.nbytes
        elif i < num_layers:  # layers past the last are MTP layers: not loaded here
            per_layer[i] += t.nbytes
    return per_layer, other


def split_layers(sizes: Sequence[int], capacity: Sequence[float], first_extra: int = 0,
                 counts: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per rank, at least one layer each.

    Minimises the largest bytes/capacity over the ranks; rank 0 also carries `first_extra`
    (embeddings, final norm, lm_head). `counts` forces the number of layers per rank.
    """
    n, ranks = len(sizes), len(capacity)
    if counts is not None:
        if len(counts) != ranks or sum(counts) != n or min(counts) < 1:
            raise ValueError(f"layer counts {list(counts)} must be {ranks} positive numbers "
                             f"adding up to {n} layers")
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        return list(zip(bounds[:-1], bounds[1:]))
    if n < ranks:
        raise ValueError(f"{n} layers cannot be split over {ranks} ranks")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)

    def cost(r, a, b):
        return (prefix[b] - prefix[a] + (first_extra if r == 0 else 0)) / capacity[r]

    # best[r][b]: (max cost, previous boundary) for ranks 0..r covering layers [0, b)
    inf = float("inf")
    best = [[(inf, -1)] * (n + 1) for _ in range(ranks)]
    for b in range(1, n - ranks + 2):
        best[0][b] = (cost(0, 0, b), 0)
    for r in range(1, ranks):
        for b in range(r + 1, n - (ranks - r - 1) + 1):
            best[r][b] = min((max(best[r - 1][a][0], cost(r, a, b)), a) for a in range(r, b))
    bounds, b = [n], n
    for r in range(ranks - 1, 0, -1):
        b = best[r][b][1]
        bounds.append(b)
    bounds.append(0)
    bounds.reverse()
    return list(zip(bounds[:-1], bounds[1:]))


def expert_range(num_experts: int, rank: int, size: int) -> Tuple[int, int]:
    """Routed experts [lo, hi) held by `rank`: contiguous ids, as even as possible."""
    if num_experts < size:
        raise ValueError(f"{num_experts} experts cannot be split over {size} ranks")
    return num_experts * rank // size, num_experts * (rank + 1) // size


def parse_counts(text: Optional[str]) -> Optional[List[int]]:
    """'30,31' -> [30, 31] (layers per rank); None or '' -> None (split by memory)."""
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--pipeline-layers must look like 30,31 (layers per rank), got {text!r}")
