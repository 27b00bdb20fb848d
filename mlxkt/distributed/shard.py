"""Module surgery on a (lazily) loaded model: done from the outside, the model code is unchanged.

Pipeline: the decoder keeps only this rank's layers; on rank 0 the final norm becomes a round
trip (send the hidden state to rank 1, receive it back from the last rank), on the other
ranks the embedding becomes a receive and the final norm a send.

Experts: every MoE block's routed experts keep only ids [lo, hi) and compute only the
(token, expert) pairs that fall there; the shared experts are split along their hidden
dimension; the block's output is a partial sum, completed by one all_sum per MoE layer.
Optionally (split_attention) each rank also keeps 1/size of the MLA heads: a second all_sum
per layer, after o_proj, and attention and the dense projections split too.
"""

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..device import env_switch
from ..loader_utils import mlx_cuda_one_group_bug

EXPERT_SHARD_ENV = "MLXKT_EXPERT_SHARD"
MOE_ATTRS = ("mlp", "block_sparse_moe")  # DeepSeek, Mixtral


# --- pipeline -------------------------------------------------------------------------------

class PipelineEntry(nn.Module):
    """Replaces embed_tokens on ranks > 0: the hidden state arrives from the previous rank."""

    def __init__(self, comm, src: int, dims: int, dtype: mx.Dtype):
        super().__init__()
        self.comm, self.src, self.dims, self.dtype = comm, src, dims, dtype

    def __call__(self, tokens: mx.array) -> mx.array:
        # tokens: [B, L] (only their shape is used) -> h: [B, L, D]
        return self.comm.recv((*tokens.shape, self.dims), self.dtype, self.src)


class PipelineSend(nn.Module):
    """Replaces the final norm on ranks > 0: hands the hidden state on (the last rank: to 0)."""

    def __init__(self, comm, dst: int, dtype: mx.Dtype):
        super().__init__()
        self.comm, self.dst, self.dtype = comm, dst, dtype

    def __call__(self, h: mx.array) -> mx.array:
        return self.comm.send(h.astype(self.dtype), self.dst)


class PipelineRoundTrip(nn.Module):
    """Replaces the final norm on rank 0: send to rank 1, wait for the last rank, then norm."""

    def __init__(self, norm: nn.Module, comm, dtype: mx.Dtype):
        super().__init__()
        self.norm = norm
        self.comm, self.dtype = comm, dtype

    def __call__(self, h: mx.array) -> mx.array:
        # Two evaluations keep the order send-then-receive (one graph could run them swapped).
        mx.eval(self.comm.send(h.astype(self.dtype), 1))
        back = self.comm.recv(h.shape, self.dtype, self.comm.size - 1)
        mx.eval(back)
        return self.norm(back)


def hidden_dtype(model) -> mx.Dtype:
    return model.model.layers[0].input_layernorm.weight.dtype


def make_pipeline_stage(model, comm, start: int, end: int) -> None:
    """Keep layers [start, end) and wire the stage's input and output (after dtype casts)."""
    inner = model.model
    inner.layers = inner.layers[start:end]
    if comm.size == 1:
        return
    dtype, dims = hidden_dtype(model), model.args.hidden_size
    if comm.rank == 0:
        inner.norm = PipelineRoundTrip(inner.norm, comm, dtype)
        return
    inner.embed_tokens = PipelineEntry(comm, comm.rank - 1, dims, dtype)
    inner.norm = PipelineSend(comm, (comm.rank + 1) % comm.size, dtype)
    if "lm_head" in model:
        model.pop("lm_head")


# --- experts --------------------------------------------------------------------------------

def moe_blocks(model):
    """(layer index, attribute name, block) for every MoE block of the decoder (the block
    itself when it is already wrapped in a ShardedMoE)."""
    for i, layer in enumerate(model.model.layers):
        for attr in MOE_ATTRS:
            block = layer.get(attr)
            if isinstance(block, ShardedMoE):
                block = block.block
            if block is not None and "switch_mlp" in block:
                yield i, attr, block


STRATEGIES = ("auto", "compact", "masked")
DECODE_TOKENS = 8  # calls with more tokens than this are prefill chunks


def default_strategy() -> str:
    """compact: compute only this rank's (token, expert) pairs; costs one host sync per MoE
    layer, cheap on a CPU and amortised over a prefill chunk. masked: fixed shapes, a foreign
    pair repeats a local expert with weight 0; no sync, but the experts path computes every
    pair. auto: compact on the CPU and for prefill, masked for GPU decode steps."""
    value = os.environ.get(EXPERT_SHARD_ENV, "").strip() or "auto"
    if value not in STRATEGIES:
        raise ValueError(f"{EXPERT_SHARD_ENV} must be one of {', '.join(STRATEGIES)}, not {value!r}")
    return value


EXPERT_PARAMS = ("weight", "scales", "biases", "bias")


def expert_params(switch_mlp: nn.Module):
    """(projection name, projection module, parameter name) of a RoutedExperts' stacks."""
    for proj_name, proj in switch_mlp.children().items():
        for p in EXPERT_PARAMS:
            if proj.get(p) is not None:
                yield proj_name, proj, p


def keep_experts(switch_mlp: nn.Module, lo: int, hi: int) -> None:
    """Slice every [E, ...] stack to experts [lo, hi) (a lazy slice still reads the whole
    stack when evaluated; the loader reads by range instead where it can)."""
    for _, proj, p in expert_params(switch_mlp):
        proj[p] = proj[p][lo:hi]


class LocalExperts(nn.Module):
    """Wraps a RoutedExperts holding only experts [lo, hi): this rank's part of the output."""

    def __init__(self, inner: nn.Module, lo: int, hi: int, strategy: str, counter: Optional[list] = None):
        super().__init__()
        self.inner = inner
        self.lo, self.hi, self.strategy = lo, hi, strategy
        self.counter = counter  # benchmark hook

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array,
                 shared: Optional[nn.Module] = None) -> mx.array:
        # x: [..., D], inds/scores: [..., K] -> [..., D] (+ this rank's part of the shared
        # experts, as split by split_shared_experts)
        K, D = inds.shape[-1], x.shape[-1]
        idx = inds.reshape(-1, K)
        local = (idx >= self.lo) & (idx < self.hi)  # [N, K]
        if self.counter is not None:  # (tokens, this rank's pairs): a host sync, benchmarks only
            self.counter.append((idx.shape[0], local.sum().item()))
        if self.resolve(idx.shape[0]) == "compact":
            y = self._compact(x.reshape(-1, D), idx, scores.reshape(-1, K), local).reshape(x.shape)
        else:
            y = self._masked(x, idx, scores.reshape(-1, K), local, inds.shape)
        return y if shared is None else y + shared(x)

    def resolve(self, tokens: int) -> str:
        if self.strategy != "auto":
            return self.strategy
        gpu_decode = mx.default_device() != mx.cpu and tokens <= DECODE_TOKENS
        return "masked" if gpu_decode else "compact"

    def syncs(self, tokens: int) -> bool:
        """Whether a call over `tokens` tokens reads values back on the host."""
        return self.counter is not None or self.resolve(tokens) == "compact"

    def _compact(self, xf, idx, scores, local):
        K = idx.shape[-1]
        n = local.sum().item()  # host sync: the number of this rank's (token, expert) pairs
        if n == 0:
            return mx.zeros_like(xf)
        key = mx.where(local, idx - self.lo, self.hi - self.lo).reshape(-1)  # foreign pairs last
        pairs = mx.argsort(key)[:n]  # grouped by expert
        tok = pairs // K
        y = self.inner(xf[tok], key[pairs][:, None], scores.reshape(-1)[pairs][:, None])  # [n, D]
        return mx.zeros_like(xf).at[tok].add(y)

    def _masked(self, x, idx, scores, local, shape):
        # A foreign pair repeats the token's first local expert (or expert lo) with weight 0.
        first = mx.argmax(local.astype(mx.int32), axis=-1, keepdims=True)
        fallback = mx.take_along_axis(idx, first, axis=-1) - self.lo
        fallback = mx.where(local.any(axis=-1, keepdims=True), fallback, 0)
        li = mx.where(local, idx - self.lo, fallback)
        w = mx.where(local, scores, mx.zeros_like(scores))
        return self.inner(x, li.reshape(shape), w.reshape(shape))


class AllSum(nn.Module):
    """all_sum of a module's partial output (this rank's share of a sum over ranks)."""

    def __init__(self, block: nn.Module, comm):
        super().__init__()
        self.block = block
        self.comm = comm

    def partial(self, x: mx.array) -> mx.array:
        return self.block(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.comm.all_sum(self.block(x))


class ShardedMoE(AllSum):
    """A MoE block over this rank's experts: one collective per MoE layer."""


# A column slice is a strided view; MLX's CUDA quantized matmuls take only row-contiguous
# weights ("No implementation for problem shape"), so every kept slice is made contiguous.

def slice_rows(layer: nn.Module, a: int, b: int) -> None:
    """Keep output rows [a, b) of a Linear / QuantizedLinear."""
    for name in ("weight", "scales", "biases", "bias"):
        if layer.get(name) is not None:
            layer[name] = mx.contiguous(layer[name][a:b])


def slice_cols(layer: nn.Module, a: int, b: int) -> None:
    """Keep input columns [a, b) of a Linear / QuantizedLinear (packed and grouped if quantized)."""
    if "scales" in layer:
        bits, gs = layer.bits, layer.group_size
        layer.weight = mx.contiguous(layer.weight[:, a * bits // 32 : b * bits // 32])
        layer.scales = mx.contiguous(layer.scales[:, a // gs : b // gs])
        if layer.get("biases") is not None:
            layer.biases = mx.contiguous(layer.biases[:, a // gs : b // gs])
    else:
        layer.weight = mx.contiguous(layer.weight[:, a:b])


def shared_split_ok(mlp: nn.Module, size: int) -> bool:
    hidden = mlp.gate_proj.weight.shape[0]
    if hidden % size:
        return False
    part = hidden // size
    down = mlp.down_proj
    if "scales" in down:
        # MLX 0.32.4's CUDA quantized matmul is wrong for rows of one group at 2-16 tokens
        # (K 64, group 64, 7 rows: every output off), so keep two groups per slice there.
        groups = 2 if mlx_cuda_one_group_bug() else 1
        return part % down.group_size == 0 and part // down.group_size >= groups
    return True


def split_shared_experts(block: nn.Module, rank: int, size: int) -> str:
    """Each rank keeps 1/size of the shared experts' hidden units (its output: a partial sum)."""
    if "shared_experts" not in block or size == 1:
        return "none"
    mlp = block.shared_experts
    if any("bias" in mlp[p] for p in ("gate_proj", "up_proj", "down_proj")) or not shared_split_ok(mlp, size):
        if rank != 0:  # rank 0 alone adds them
            block.pop("shared_experts")
        return "rank 0"
    part = mlp.gate_proj.weight.shape[0] // size
    a, b = rank * part, (rank + 1) * part
    slice_rows(mlp.gate_proj, a, b)
    slice_rows(mlp.up_proj, a, b)
    slice_cols(mlp.down_proj, a, b)
    return "split"


# --- attention heads (experts mode, optional) ----------------------------------------------

SPLIT_ATTENTION_ENV = "MLXKT_SPLIT_ATTENTION"


def split_attention_default(backend: str) -> bool:
    """Split MLA heads across ranks: 1/0 from MLXKT_SPLIT_ATTENTION, else on over NCCL (GPUs
    of one host: a second all_sum per layer costs microseconds) and off elsewhere (over
    Thunderbolt each all_sum costs more than the attention it saves at short context)."""
    forced = env_switch(SPLIT_ATTENTION_ENV)
    return backend == "nccl" if forced is None else forced


class AllSumLinear(AllSum):
    """An output projection that sees only this rank's heads: its output is a partial sum."""


def can_split_attention(attn: nn.Module, size: int) -> bool:
    """An MLAttention whose heads, and o_proj's quantization groups, split evenly."""
    H = getattr(attn, "num_heads", 0)
    if not hasattr(attn, "embed_q") or size == 1 or H % size:
        return False
    cols, o = H // size * attn.unembed_out.weight.shape[1], attn.o_proj
    return "scales" not in o or (cols % o.group_size == 0 and cols * o.bits % 32 == 0)


def split_attention(attn: nn.Module, comm) -> None:
    """Keep this rank's 1/size of an MLAttention's heads (queries, absorbed up-projections,
    o_proj columns); the latent cache is shared by all heads, so every rank keeps it whole."""
    part, v = attn.num_heads // comm.size, attn.unembed_out.weight.shape[1]
    o = attn.o_proj
    a, b = comm.rank * part, (comm.rank + 1) * part
    q = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
    slice_rows(q, a * attn.q_head_dim, b * attn.q_head_dim)
    for m in (attn.embed_q, attn.unembed_out):  # [H, ...] stacks
        for name in ("weight", "scales", "biases"):
            if m.get(name) is not None:
                m[name] = mx.contiguous(m[name][a:b])
    slice_cols(o, a * v, b * v)
    if comm.rank != 0 and o.get("bias") is not None:  # added once, by rank 0
        o.pop("bias")
    attn.o_proj = AllSumLinear(o, comm)
    attn.num_heads = part


def wrap_experts(model, comm, lo: int, hi: int, strategy: str, counter: Optional[list] = None) -> None:
    """Swap in LocalExperts and ShardedMoE (after the weights are sliced and loaded)."""
    for i, attr, block in list(moe_blocks(model)):
        if isinstance(model.model.layers[i][attr], ShardedMoE):
            continue
        block.switch_mlp = LocalExperts(block.switch_mlp, lo, hi, strategy, counter)
        model.model.layers[i][attr] = ShardedMoE(block, comm)
