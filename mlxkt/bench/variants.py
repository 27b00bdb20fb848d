"""Experimental engine variants, applied to a loaded mlxkt model at run time so they can be
measured against the engine as it is, in the same run. Nothing here changes the engine's
files; what pays off moves into the engine.

- compiled:      decode through the engine's compiled layers (layers/decode_compile.py;
                 the default on NVIDIA GPUs).
- eager:         the compiled layers forced off (the "before" where they are the default).
- one-stream:    attention on one CPU stream (layers/cpu_heads.py spreads the heads over
                 two on a CPU with long caches): the before/after of that change.
- mla-gemm:      the decode attention over the latent cache as three GEMMs (all heads as
                 rows) instead of a score matmul + SDPA with the rope scores as the mask.
- no-segments:   the engine's segmented prefill of the routed experts (one dense quantized
                 matmul per expert, layers/expert_segments.py; moved in from the former
                 moe-segments variant) turned off for this engine, i.e. gather_qmm as
                 before: the before/after of that change in one run.
- gemv / no-gemv: the dense quantized linear layers through mlxkt's GEMV kernel
                 (kernels/qgemv.py; the default on CUDA), or back on MLX's quantized matmul;
                 since 2026-11-26 (ninth session) MLA's per-head linears too (the lanes
                 kernel), so no-gemv results from before then left those on MLX either way.
- no-mla-kernel / mla-kernel: one-token decode attention without / with the MLA decode
                 kernels (kernels/mla_decode.py; off by default, MLXKT_MLA_KERNEL=1).
- no-fused-shared: the shared expert as its own linears again instead of inside the
                 routed-expert kernels' launches (kernels/moe.py; the default where the
                 kernels run and the shared expert has one routed expert's shape).
- no-fold:       the RMSNorms before the q/kv projections and the residual adds as their own
                 kernels again, not folded into the GEMV and expert kernels' launches
                 (layers/decode_compile.py; the default on CUDA since 2026-11-26).
- no-mla-prep / mla-prep: the MLA decode prologue (latent norm, ropes, query copy and scale)
                 as MLX ops / as one kernel (kernels/mla_prep.py; the default on CUDA).
- no-pad-keys / pad-keys: decode attention over exactly the valid keys / over their count
                 rounded up to a multiple of 8 with the rest masked (layers/key_padding.py;
                 default on CUDA from 8192 keys).
- moe-rw4-rb4:   the routed-expert kernels with 4 row pairs per stage-1 warp and 4 rows per
                 stage-2 warp (benchmarks/kernels.py --sweep's fastest at 1 token on an
                 H200, 2026-11-26; slower at 2 and 8 tokens).
- no-moe-xs / moe-xs3: routed-expert stage 2 at one token as before 2026-11-26 (each warp
                 walks all experts for its own rows), resp. with 3 warps per block splitting
                 the experts (launch keys xs, nw; with the shared expert a token's 9
                 experts split 3/3/3 instead of the default's 3/2/2/2).
- no-fused-rows: MLA's q_a_proj and kv_a_proj_with_mqa as two launches again instead of one
                 stacked linear (layers/fused_rows.py; the default where the GEMV kernel
                 runs, since 2026-11-26): the before of that change.
- no-addmm-scores / addmm-scores: decode attention scores by MLX's SDPA (scale, GEMM, mask
                 add as kernels of their own) / by one mx.addmm (layers/mla_scores.py; the
                 default on CUDA since 2026-11-26).
- gate-norm:     a MoE layer's post-attention RMSNorm and its router logits as one launch
                 instead of two (kernels/gate_norm.py; off by default, MLXKT_GATE_NORM=1).
- host-pos:      the compiled decode step's position (and the MLA kernels' meta) read by
                 every layer from the host-made array itself, not from one GPU copy
                 (layers/decode_compile.StepArrays; the copy is the default on CUDA).
- sdpa-prefill:  prefill chunks' attention through MLX's fused SDPA again (cuDNN on CUDA,
                 a new graph for every new prompt length) instead of explicit matmul +
                 softmax (layers/mla.py explicit_rows; the default on CUDA).
- no-lanes / lanes-rows: MLA's per-head embed_q / unembed_out on MLX's batched quantized
                 matmul again instead of the lanes kernel (kernels/qgemv_lanes.py; the
                 default where the GEMV kernel runs) / short rows of one matrix (q_b_proj)
                 on the lanes kernel too instead of the block-per-row GEMV.
- fused-proj:    projections that share their input as one linear each: q_a_proj with
                 kv_a_proj_with_mqa, and gate_proj with up_proj in the shared experts and
                 dense MLPs (rows concatenated, output split), so a decode step launches two
                 kernels fewer per layer. Holds a second copy of those weights.
- no-buffer-attention / buffer-attention: a compiled one-token decode step's cache write
                 and attention eager over exactly the valid keys / compiled over the cache's
                 whole buffer (layers/cache_buffer.py; the default on CUDA since 2026-11-27).
- buffer-dynamic-write / buffer-static-write: that step's cache writes inside the compiled
                 piece at an array position (DynamicSliceUpdate, a copy of the buffer) / eager
                 at the known offset, in place, with only the attention compiled (the
                 default since 2026-11-27's twelfth session: 13 µs a write against 2 on an H200).
- prefill-N:     prompts prefilled in chunks of N tokens (512, 1024, 2048 or 4096) instead
                 of the engine's own choice (generate.prefill_step).
"""

from functools import partial

import mlx.core as mx

from ..layers.decode_compile import set_compiled_decode
from ..layers.experts import RoutedExperts
from ..layers.fused_rows import concat_linears, unfuse
from ..layers.mla import ABSORB_MAX_L, MLAttention
from ..layers.moe import MLP, DeepseekMoE
from ..layers.qlinear import KernelQuantizedLinear, KernelQuantizedMultiLinear, norm_linear
from .measure import Engine


def _mla_gemm(attn, q, q_pe, k, v, k_pe, mask=None):
    """Absorbed MLA attention as three GEMMs over the shared latent: all heads' queries form
    the rows, so the cache is read once per GEMM instead of once per head."""
    # q: [B, H, L, r], q_pe: [B, H, L, rope] (pre-scaled), k = v = latent / k_pe: [B, 1, S, *]
    B, H, L, r = q.shape
    if k.shape[1] != 1 or L > ABSORB_MAX_L:  # the expanded prefill path
        return type(attn).attend(attn, q, q_pe, k, v, k_pe, mask)
    ql = q.reshape(B, 1, H * L, r) * attn.scale
    qp = q_pe.reshape(B, 1, H * L, -1)
    scores = ql @ k.swapaxes(-1, -2) + qp @ k_pe.swapaxes(-1, -2)  # [B, 1, H*L, S]
    if mask is not None:
        scores = scores.reshape(B, H, L, -1)
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        scores = scores.reshape(B, 1, H * L, -1)
    p = mx.softmax(scores, axis=-1, precise=True)
    return (p @ v).reshape(B, H, L, r)


def _gemm_attention(engine: Engine):
    for layer in engine.model.model.layers:
        layer.self_attn.attend = partial(_mla_gemm, layer.self_attn)
        layer.self_attn.buffer_attention = False  # which would not call attend


def _no_segments(engine: Engine):
    """The routed experts' segmented prefill (layers/expert_segments.py) off, on this
    engine's modules only: other engines in the same process keep it."""
    for m in engine.model.modules():
        if isinstance(m, RoutedExperts):
            m.segments = False


def _no_fused_shared(engine: Engine):
    for m in engine.model.modules():
        if isinstance(m, RoutedExperts):
            m.fuse_shared = False


def _moe_launch(**config):
    def apply(engine: Engine):
        for m in engine.model.modules():
            if isinstance(m, RoutedExperts):
                m.__dict__["launch"] = config  # a plain attribute: Module keeps dicts as children
    return apply


# Variants that change prefill too: the bench times their prefill (the others are decode-only).
PREFILL_VARIANTS = {"no-segments", "one-stream", "sdpa-prefill",
                    "prefill-512", "prefill-1024", "prefill-2048", "prefill-4096"}

def _one_stream(engine: Engine):
    for layer in engine.model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "attend_heads"):
            attn.attend = attn.attend_heads


def _gemv(engine: Engine):
    from ..inject import optimize

    optimize(engine.model, rules=(), linears=True)


def _no_gemv(engine: Engine):
    from ..inject import plain_linears

    plain_linears(engine.model)


def _split_by(fused, n: int):
    return lambda x, norm=None: tuple(mx.split(norm_linear(fused, x, norm), [n], axis=-1))


def _fused_proj(engine: Engine):
    model = engine.model
    made = []
    for layer in list(model.model.layers) + (list(model.mtp.layers) if "mtp" in model else []):
        attn = layer.get("self_attn")
        if getattr(attn, "q_lora_rank", None) is not None:  # DeepSeek's MLA
            fused = concat_linears(attn.q_a_proj, attn.kv_a_proj_with_mqa)
            if fused is not None:
                attn.down_projections = _split_by(fused, attn.q_lora_rank)
                made.append(fused)
        mlp = layer.get("mlp")  # Mixtral's layers have none
        for mlp in (mlp, mlp.get("shared_experts") if mlp is not None else None):
            fused = concat_linears(mlp.gate_proj, mlp.up_proj) if isinstance(mlp, MLP) else None
            if fused is not None:
                mlp.gate_up = _split_by(fused, mlp.gate_proj.weight.shape[0])
                made.append(fused)
    mx.eval([m.parameters() for m in made])  # held by the closures, not the model


def _host_positions(engine: Engine):
    for layer in engine.model.layers:
        compiled = getattr(layer, "compiled_decode", None)
        if compiled is not None:
            compiled.steps.device_copy = False


def _prefill_step(n: int):
    def apply(engine: Engine):
        engine.prefill_step = n
    return apply


def _attention_switch(name: str, on: bool, kind=MLAttention):
    """A variant that sets one plain attribute (a switch) of every `kind` module."""
    def apply(engine: Engine):
        for m in engine.model.modules():
            if isinstance(m, kind):
                setattr(m, name, on)
    return apply


VARIANTS = {
    "compiled": lambda e: set_compiled_decode(e.model, True),
    "eager": lambda e: set_compiled_decode(e.model, False),
    "one-stream": _one_stream,
    "mla-gemm": _gemm_attention,
    "no-segments": _no_segments,
    "gemv": _gemv,
    "no-gemv": _no_gemv,
    "fused-proj": _fused_proj,
    "no-fused-rows": lambda e: unfuse(e.model),
    "host-pos": _host_positions,
    "gate-norm": _attention_switch("gate_norm", True, DeepseekMoE),
    "no-addmm-scores": _attention_switch("addmm_scores", False),
    "addmm-scores": _attention_switch("addmm_scores", True),
    "no-mla-kernel": _attention_switch("mla_kernel", False),
    "mla-kernel": _attention_switch("mla_kernel", True),
    "no-fused-shared": _no_fused_shared,
    "moe-rw4-rb4": _moe_launch(rw=4, rb=4),
    "no-moe-xs": _moe_launch(xs=0),
    "moe-xs3": _moe_launch(nw=(4, 3)),
    "no-fold": _attention_switch("fold_norms", False),
    "no-mla-prep": _attention_switch("prep_kernel", False),
    "no-mla-queries": _attention_switch("queries_kernel", False),
    "mla-queries": _attention_switch("queries_kernel", True),
    "mla-prep": _attention_switch("prep_kernel", True),
    "no-pad-keys": _attention_switch("pad_keys", False),
    "no-lanes": _attention_switch("lanes", False, KernelQuantizedMultiLinear),
    "lanes-rows": _attention_switch("lanes", True, KernelQuantizedLinear),
    "sdpa-prefill": _attention_switch("explicit_prefill", False),
    "pad-keys": _attention_switch("pad_keys", True),
    "no-buffer-attention": _attention_switch("buffer_attention", False),
    "buffer-attention": _attention_switch("buffer_attention", True),
    "buffer-static-write": _attention_switch("static_cache_write", True),
    "buffer-dynamic-write": _attention_switch("static_cache_write", False),
    **{f"prefill-{n}": _prefill_step(n) for n in (512, 1024, 2048, 4096)},
}


def apply_variant(engine: Engine, name: str) -> None:
    """Apply one variant, or several joined by '+' (e.g. compiled+mla-gemm)."""
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ValueError(f"unknown variant {part!r} (known: {', '.join(sorted(VARIANTS))})")
        VARIANTS[part](engine)
    engine.name = f"mlxkt+{name}"
    engine.variant = name
    engine.decode_only = not PREFILL_VARIANTS.intersection(name.split("+"))
    engine.notes.append(f"variant {name}")
