"""The conversion plan: every output tensor (name, dtype, shape) and the jobs that fill it,
computed from the source headers alone, before any tensor data is read.

Knowing every output shape up front lets the writer lay out each shard's header first and
then stream tensor bytes into place, and gives the exact output size for the disk preflight.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from .errors import ConvertError
from .recipes import quant_params
from .rules import MODEL_RULES, match
from .source import ITEMSIZE, TensorInfo

OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
SCALE_SUFFIX = "_scale_inv"
FLOAT_SOURCE = ("BF16", "F16", "F32", "F8_E4M3")


@dataclass
class Options:
    bits: int = 4
    group_size: int = 64
    quantize: bool = True
    dtype: str = "bfloat16"
    recipe: str = "uniform"
    max_shard_bytes: int = 5 * 2**30


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors code
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass
class Job:
    """Read one source tensor (rows, or whole for kv_b) and write it into output tensors."""

    kind: str  # "rows" | "kv_b"
    src: TensorInfo
    scale: Optional[TensorInfo]
    out: str  # quantized/quantizable module path, or full tensor name for a param
    quant: Optional[dict]  # {"group_size", "bits"}; for kv_b: (embed_q, unembed_out) pair
    dtype: str  # output float dtype code
    row0: int = 0  # first output row (expert slot offset)
    module: bool = True  # out is a module path (".weight" etc. appended)
    heads: Tuple[int, int] = (0, 0)  # kv_b: (num_heads, qk_nope_head_dim)


@dataclass
class Unit:
    tensors: List[OutTensor]
    jobs: List[Job]
    modules: Dict[str, Union[dict, bool]] = field(default_factory=dict)
    params: int = 0  # logical parameter count
    mtp: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Shard:
    filename: str
    units: List[Unit]

    @property
    def tensors(self) -> List[OutTensor]:
        return [t for u in self.units for t in u.tensors]

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


@dataclass
class Plan:
    shards: List[Shard]  # main shards, then mtp.safetensors if any
    overrides: Dict[str, Union[dict, bool]]
    options: Options
    fingerprint: str

    @property
    def main_shards(self) -> List[Shard]:
        return [s for s in self.shards if s.filename != "mtp.safetensors"]

    @property
    def main_params(self) -> int:
        return sum(u.params for s in self.main_shards for u in s.units)

    @property
    def main_bytes(self) -> int:
        return sum(s.nbytes for s in self.main_shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def bits_per_weight(self) -> float:
        return self.main_bytes * 8 / max(self.main_params, 1)


def module_tensors(module: str, shape, quant: Optional[dict], dtype: str) -> List[OutTensor]:
    """Output tensors of one module whose (logical) weight has `shape` [..., out, in]."""
    if quant is None:
        return [OutTensor(f"{module}.weight", dtype, tuple(shape))]
    *lead, n_in = shape
    q = [OutTensor(f"{module}.weight", "U32", (*lead, n_in * quant["bits"] // 32))]
    groups = (*lead, n_in // quant["group_size"])
    return q + [OutTensor(f"{module}.scales", dtype, groups), OutTensor(f"{module}.biases", dtype, groups)]


def _natural(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


class _Builder:
    def __init__(self, tensors: Dict[str, TensorInfo], config: dict, opts: Options):
        self.config, self.opts = config, opts
        self.rules = MODEL_RULES[config["model_type"]]
        self.dtype = OUT_DTYPES[opts.dtype]
        qc = config.get("quantization_config") or {}
        self.block = tuple(qc.get("weight_block_size") or (128, 128))
        self.tensors = tensors
        self.units: List[Unit] = []
        self.experts: Dict[str, dict] = {}

    def quant(self, role: str, in_dim: int) -> Optional[dict]:
        o = self.opts
        return quant_params(o.recipe, role, in_dim, o.bits, o.group_size) if o.quantize else None

    def scale_for(self, t: TensorInfo) -> Optional[TensorInfo]:
        s = self.tensors.get(t.name + SCALE_SUFFIX)
        if t.dtype == "F8_E4M3":
            if s is None:
                raise ConvertError(f"{t.file}: tensor {t.name}: FP8 weight without {t.name}{SCALE_SUFFIX}")
            if len(t.shape) != 2:
                raise ConvertError(f"{t.file}: tensor {t.name}: FP8 weight must be 2-D, got {list(t.shape)}")
            want = tuple(-(-d // b) for d, b in zip(t.shape, self.block))
            if s.shape != want:
                raise ConvertError(
                    f"{s.file}: tensor {s.name}: scale shape {list(s.shape)}, expected {list(want)}"
                    f" for {list(t.shape)} in {self.block[0]}x{self.block[1]} blocks"
                )
            if s.dtype not in ("F32", "BF16", "F16"):
                raise ConvertError(f"{s.file}: tensor {s.name}: bad scale dtype {s.dtype}")
        elif s is not None:
            raise ConvertError(f"{s.file}: tensor {s.name}: scale for a non-FP8 weight ({t.dtype})")
        return s

    def add(self, t: TensorInfo):
        m = match(self.rules, self.config, t.name, t.file)
        if m.kind == "skip":
            return
        if t.dtype not in FLOAT_SOURCE:
            raise ConvertError(f"{t.file}: tensor {t.name}: unsupported dtype {t.dtype}")
        scale = self.scale_for(t)
        if m.kind == "param":
            dtype = "F32" if m.role == "router_bias" else self.dtype
            out = OutTensor(m.out, dtype, t.shape)
            job = Job("rows", t, scale, m.out, None, dtype, module=False)
            # Routers stay unquantized; say so explicitly (Mixtral's gate is an nn.Linear).
            mods = {m.out[: -len(".weight")]: False} if m.role == "router" else {}
            self.units.append(Unit([out], [job], mods, math.prod(t.shape), m.mtp))
            return
        if len(t.shape) != 2:
            raise ConvertError(f"{t.file}: tensor {t.name}: expected a 2-D weight, got {list(t.shape)}")
        if m.kind == "expert":
            self.experts.setdefault(m.out, {})[m.expert] = (t, scale, m)
        elif m.kind == "kv_b":
            self.add_kv_b(t, scale, m)
        else:
            module = m.out[: -len(".weight")]
            q = self.quant(m.role, t.shape[-1])
            job = Job("rows", t, scale, module, q, self.dtype)
            ts = module_tensors(module, t.shape, q, self.dtype)
            self.units.append(Unit(ts, [job], {module: q or False}, math.prod(t.shape), m.mtp))

    def add_kv_b(self, t: TensorInfo, scale, m):
        c = self.config
        H, nope, v, r = (c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"],
                         c["kv_lora_rank"])
        if t.shape != (H * (nope + v), r):
            raise ConvertError(
                f"{t.file}: tensor {t.name}: shape {list(t.shape)}, config says {[H * (nope + v), r]}"
            )
        base = m.out[: -len("kv_b_proj.weight")]
        eq, uo = base + "embed_q", base + "unembed_out"
        qe, qu = self.quant(m.role, nope), self.quant(m.role, r)
        ts = module_tensors(eq, (H, r, nope), qe, self.dtype) + module_tensors(uo, (H, v, r), qu, self.dtype)
        job = Job("kv_b", t, scale, base, (qe, qu), self.dtype, heads=(H, nope))
        self.units.append(Unit(ts, [job], {eq: qe or False, uo: qu or False}, math.prod(t.shape), m.mtp))

    def finish_experts(self):
        E = self.config.get(self.rules.num_experts_key)
        for out, slots in self.experts.items():
            t0, _, m = next(iter(slots.values()))
            if not isinstance(E, int) or sorted(slots) != list(range(E)):
                missing = sorted(set(range(E if isinstance(E, int) else 0)) - set(slots))
                raise ConvertError(
                    f"{t0.file}: tensor {t0.name}: experts of {out} are not 0..{E}-1"
                    + (f" (missing {missing[:4]})" if missing else f" (found {len(slots)})")
                )
            for e, (t, _, _) in slots.items():
                if t.shape != t0.shape:
                    raise ConvertError(f"{t.file}: tensor {t.name}: shape {list(t.shape)} differs from expert 0's {list(t0.shape)}")
            module = out[: -len(".weight")]
            rows, n_in = t0.shape
            q = self.quant(m.role, n_in)
            jobs = [Job("rows", slots[e][0], slots[e][1], module, q, self.dtype, e * rows) for e in range(E)]
            ts = module_tensors(module, (E, rows, n_in), q, self.dtype)
            self.units.append(Unit(ts, jobs, {module: q or False}, E * rows * n_in, m.mtp))

    def check_complete(self):
        names = {t.name for u in self.units for t in u.tensors}
        where = next(iter(self.tensors.values())).file.parent
        required = ["model.embed_tokens.weight", "model.norm.weight"] + [
            f"model.layers.{i}.{r}" for i in range(self.config["num_hidden_layers"]) for r in self.rules.required
        ]
        for n in required:
            if n not in names:
                raise ConvertError(f"{where}: tensor {n} is missing")


def build_plan(tensors: Dict[str, TensorInfo], config: dict, opts: Options) -> Plan:
    b = _Builder(tensors, config, opts)
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            w = name[: -len(SCALE_SUFFIX)]
            if w not in tensors:
                raise ConvertError(f"{t.file}: tensor {name}: scale without a weight {w}")
            continue
        b.add(t)
    b.finish_experts()
    b.check_complete()
    units = sorted(b.units, key=lambda u: _natural(u.tensors[0].name))
    main = [u for u in units if not u.mtp]
    mtp = [u for u in units if u.mtp]
    groups: List[List[Unit]] = []
    size = 0
    for u in main:
        if not groups or (size + u.nbytes > opts.max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.nbytes
    n = len(groups)
    shards = [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]
    if mtp:
        shards.append(Shard("mtp.safetensors", mtp))
    overrides = {}
    for u in units:
        overrides.update(u.modules)
    return Plan(shards, overrides, opts, _fingerprint(shards, tensors, opts))


def _fingerprint(shards, tensors, opts) -> str:
    doc = {
        "options": vars(opts),
        "source": sorted((t.name, t.file.name, t.dtype, t.shape, t.start) for t in tensors.values()),
        "shards": [(s.filename, [(t.name, t.dtype, t.shape) for t in s.tensors]) for s in shards],
    }
    return hashlib.sha256(json.dumps(doc, default=list).encode()).hexdigest()
