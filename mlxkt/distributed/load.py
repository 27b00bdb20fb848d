"""Load only this rank's part of a converted model.

mlx-lm's load_model(lazy=True) reads no tensor data: it builds the module tree with lazy
arrays backed by the safetensors files. The model is cut to this rank's part first, then
evaluated one layer at a time, so only the kept tensors are read. A slice of a lazy array
would still read the whole tensor, so the routed-expert stacks [E, out, in] are read as byte
ranges (this rank's experts are contiguous rows) straight from the files via the index.
"""

import sys
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_reduce
from mlx_lm.utils import load_model

from ..loader import check_converted, default_dtype, device_passes, load_config, load_tokenizer
from ..loader_utils import cast_floats
from ..models import get_model_classes
from . import plan, shard

NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
             "U32": np.uint32, "I32": np.int32, "U16": np.uint16, "I16": np.int16,
             "U8": np.uint8, "I8": np.int8, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_}


def read_rows(entry: plan.TensorEntry, lo: int, hi: int) -> Optional[mx.array]:
    """Rows [lo, hi) of a stored tensor, reading only their bytes (None: dtype not handled)."""
    if entry.dtype not in NP_DTYPES:
        return None
    row = entry.nbytes // entry.shape[0]
    with open(entry.file, "rb") as f:
        f.seek(entry.start + lo * row)
        data = np.frombuffer(f.read((hi - lo) * row), dtype=NP_DTYPES[entry.dtype])
    arr = mx.array(data.reshape((hi - lo, *entry.shape[1:])))
    return arr.view(mx.bfloat16) if entry.dtype == "BF16" else arr


def slice_experts(model, index: dict, lo: int, hi: int, num_experts: int) -> int:
    """Keep experts [lo, hi) of every switch_mlp; returns how many tensors were range-read."""
    ranged = 0
    for i, attr, block in shard.moe_blocks(model):
        for proj_name, proj, p in shard.expert_params(block.switch_mlp):
            name = f"model.layers.{i}.{attr}.switch_mlp.{proj_name}.{p}"
            full = proj[p]
            if full.shape[0] != num_experts:
                raise ValueError(f"{name}: {full.shape[0]} experts, expected {num_experts}")
            entry = index.get(name)
            part = None
            if entry is not None and tuple(entry.shape) == tuple(full.shape):
                part = read_rows(entry, lo, hi)
            ranged += part is not None
            proj[p] = part if part is not None else full[lo:hi]  # the fallback reads it all
    return ranged


def num_experts(args) -> int:
    n = args.n_routed_experts or args.num_local_experts
    if not n:
        raise ValueError(f"{args.model_type}: no routed experts to split; use --distributed pipeline")
    return n


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def load_rank(model_path, mode: str, comm, layer_counts: Optional[str] = None,
              dtype: Optional[mx.Dtype] = None, counter: Optional[list] = None) -> Tuple[object, object]:
    """-> (model, tokenizer or None on ranks > 0). The model is cut to this rank's part."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    config = load_config(path)
    check_converted(path, config)
    model, config = load_model(path, lazy=True, strict=True, get_model_classes=get_model_classes)
    index = plan.weight_index(path)
    args = model.args
    dtype = dtype or default_dtype()
    if dtype is not None:
        cast_floats(model, dtype, getattr(model, "cast_predicate", None))
    if mode == "pipeline":
        sizes, other = plan.layer_bytes(index, args.num_hidden_layers)
        from ..device import memory_bytes

        capacity = comm.gather_floats(float(memory_bytes()))
        ranges = plan.split_layers(sizes, capacity, other, plan.parse_counts(layer_counts))
        start, end = ranges[comm.rank]
        shard.make_pipeline_stage(model, comm, start, end)
        what = f"pipeline: layers {start}..{end - 1} of {args.num_hidden_layers}"
    elif mode == "experts":
        E = num_experts(args)
        lo, hi = plan.expert_range(E, comm.rank, comm.size)
        ranged = slice_experts(model, index, lo, hi, E)
        shared = "none"
        for _, _, block in shard.moe_blocks(model):
            shared = shard.split_shared_experts(block, comm.rank, comm.size)
        if dtype is not None:  # the range reads come in the file's dtype
            cast_floats(model, dtype, getattr(model, "cast_predicate", None))
        if comm.rank != 0 and "lm_head" in model:  # only rank 0 turns hidden states into logits
            model.pop("lm_head")
        heads = "whole on every rank"
        if shard.split_attention_default(comm.backend):
            attns = [layer.self_attn for layer in model.model.layers]
            if attns and all(shard.can_split_attention(a, comm.size) for a in attns):
                for a in attns:
                    shard.split_attention(a, comm)
                heads = f"{attns[0].num_heads} of {attns[0].num_heads * comm.size} heads per rank"
            elif comm.size > 1:
                heads += " (not MLA, or its heads do not split evenly)"
        strategy = shard.default_strategy()
        shard.wrap_experts(model, comm, lo, hi, strategy, counter)
        what = (f"experts: routed experts {lo}..{hi - 1} of {E} ({ranged} tensors read by range, "
                f"{strategy}), shared experts: {shared}, attention: {heads}")
    else:
        raise ValueError(f"distributed mode must be pipeline or experts, not {mode!r}")
    device_passes(model)  # sharded linears take the GEMV kernel too
    for layer in model.model.layers:  # one layer at a time bounds the transient memory
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    held = tree_reduce(lambda a, x: a + x.nbytes, model.parameters(), 0)
    print(f"[mlxkt] rank {comm.rank}/{comm.size} {what}; holds {human_bytes(held)}", file=sys.stderr, flush=True)
    tokenizer = None
    if comm.rank == 0:
        eos = config.get("eos_token_id")
        tokenizer = load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return model, tokenizer
