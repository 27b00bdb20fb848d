"""Multi-head latent attention (DeepSeek-V2/V3) with absorbed weights and a compressed cache.

The cache holds, per token and layer, only the normalised kv latent (kv_lora_rank) and the
roped shared key (qk_rope_head_dim), never per-head K/V. For few query tokens (decode, MTP
verification) the up-projections are absorbed into the query and the output, so attention
runs directly over the latent; for long prefills expanding K/V per head is cheaper.
"""

from functools import lru_cache
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.rope_utils import apply_yarn_mscale, initialize_rope

from ..config import ModelArgs
from ..device import env_switch
from ..kernels import mla_decode, mla_prep, mla_queries
from ..kernels.dispatch import checked, gpu_backend, kernels_enabled, probe_tolerance
from .cpu_heads import split_heads
from . import mla_scores
from .key_padding import padded_keys
from .fused_rows import split_call
from .qlinear import KernelQuantizedLinear, heads_linear, norm_linear

# Query lengths up to this use the absorbed path.
ABSORB_MAX_L = 16
# Prefill attention is explicit only while its scores (batch x heads x rows x keys) stay this
# small: 1 GiB per bf16 array of them (the path holds a few at once: rope scores, products,
# softmax), 512 query rows over 8192 keys at DeepSeek-V3's 128 heads.
EXPLICIT_MAX_SCORES = 1 << 29


def as_rows(a: mx.array) -> mx.array:
    """[B, H, L, *] -> [B, 1, H * L, *] (no node when it already is: MLX makes one for any
    reshape, even to the same shape)."""
    return a if a.shape[1] == 1 else a.reshape(a.shape[0], 1, -1, a.shape[-1])


def explicit_attention() -> bool:
    """Attention of 2 or more query rows as plain matmul + softmax instead of MLX's fused
    SDPA: MLXKT_EXPLICIT_ATTENTION=1/0, else on CUDA, where MLX hands those shapes to cuDNN
    and cuDNN builds a new graph for every (rows, keys) shape (~45 ms each on an H200: an
    MTP verify step went from 2.1 ms to 48 ms once the cache grew, and a prompt of a new
    length pays it in its last prefill chunk). One query row is not affected."""
    forced = env_switch("MLXKT_EXPLICIT_ATTENTION")
    return gpu_backend() == "cuda" if forced is None else forced


def decode_kernel_backend(forced: Optional[bool], length: int) -> Optional[str]:
    """The GPU backend whose MLA decode kernels should run a step over `length` keys, or None.
    Off unless asked for (a layer's `mla_kernel`, or MLXKT_MLA_KERNEL=1), up to
    mla_decode.max_keys: on an H200 they cut a decode step's kernels (309 -> 266 on the
    bench slice) but decoded at 0.95-1.07x, within the noise (benchmarks/RESULTS.md), and no
    Mac has measured them."""
    if forced is None:
        forced = env_switch(mla_decode.ENV)
    if not forced:  # the default: no further checks on every step
        return None
    backend = gpu_backend() if kernels_enabled() else None
    if backend is None:
        return None
    return backend if length <= mla_decode.max_keys(backend) else None


def prep_backend(forced: Optional[bool]) -> Optional[str]:
    """The GPU backend whose MLA prologue kernel should run (kernels/mla_prep.py), or None."""
    backend = gpu_backend() if kernels_enabled() else None
    if backend is None:
        return None
    return backend if (mla_prep.enabled(backend) if forced is None else forced) else None


@lru_cache(maxsize=None)
def prep_ready(backend: str, signature) -> bool:
    return checked(f"{backend} MLA prologue", lambda: mla_prep.probe(backend, signature),
                   probe_tolerance(signature[6]))


@lru_cache(maxsize=None)
def decode_kernel_ready(backend: str, signature) -> bool:
    return checked(f"{backend} MLA decode", lambda: mla_decode.probe(backend, signature),
                   probe_tolerance(signature[3]))


class MLAttention(nn.Module):
    # None: MLXKT_MLA_KERNEL decides (off when unset); False/True: never/on a GPU (a plain
    # attribute, not a parameter: the bench's variants set it per engine).
    mla_kernel: Optional[bool] = None
    # False: RMSNorms and residual adds as their own kernels, never folded into the GEMV and
    # expert kernels (the bench variant "no-fold": the before of that change).
    fold_norms: bool = True
    # None: mla_prep.enabled decides (CUDA); False/True: the MLA prologue kernel never/on a GPU.
    prep_kernel: Optional[bool] = None
    # None: mla_queries.backend_for decides (CUDA); False/True: a one-token step's q_b_proj,
    # prologue and embed_q never / always (on a GPU) in the one launch of the MLA queries kernel.
    queries_kernel: Optional[bool] = None
    # None: key_padding decides (CUDA, long caches); False/True: never/always.
    pad_keys: Optional[bool] = None
    # None: mla_scores decides (CUDA); False/True: decode scores by SDPA / by one addmm.
    addmm_scores: Optional[bool] = None
    # None: cache_buffer.enabled decides (CUDA); False/True: a compiled one-token decode step
    # attends over exactly the valid keys (eager) / over the cache's whole buffer (compiled).
    buffer_attention: Optional[bool] = None
    # True: that step writes the cache eagerly (SliceUpdates at the known offset, in place) and
    # compiles only the attention; False: it writes at an array position inside the compiled
    # piece, which copies the buffer (its input is not donated: 13 µs a write on an H200 at
    # 1K keys against 2; the bench variant buffer-dynamic-write).
    static_cache_write: bool = True
    # None (or True, the same): explicit_attention() decides for prefill chunks too, up to
    # EXPLICIT_MAX_SCORES; False: prefill chunks (more than ABSORB_MAX_L rows) always through
    # MLX's fused SDPA (the bench variant sdpa-prefill).
    explicit_prefill: Optional[bool] = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = H = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.q_head_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        D, bias = args.hidden_size, args.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            D, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias
        )
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.embed_q = MultiLinear(self.qk_nope_head_dim, self.kv_lora_rank, H)
        self.unembed_out = MultiLinear(self.kv_lora_rank, args.v_head_dim, H)
        self.o_proj = nn.Linear(H * args.v_head_dim, D, bias=bias)

        # YaRN: mscale enters the softmax scale too (squared), as in DeepSeek's code.
        self.scale = apply_yarn_mscale(self.q_head_dim**-0.5, args.rope_scaling)
        self.rope = initialize_rope(
            self.qk_rope_head_dim,
            base=args.rope_theta,
            traditional=True,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )
        # The rope as the MLA prologue kernel computes it (None: a kind it does not reproduce);
        # its table also as a private array, evaluated before compiled decode traces.
        self.prep_rope = mla_prep.rope_table(self.rope, self.qk_rope_head_dim)
        if self.prep_rope is not None:
            self._prep_inv = self.prep_rope.inv

    def project(self, x: mx.array, offset=0, norm=None):
        """Queries and the new cache entries of x (of norm(x), for the layer's input RMSNorm
        `norm`, which the GEMV kernel folds into its launches), roped at `offset`.
        x: [B, L, D] -> q_nope, q_pe [B, H, L, *]; latent [B, 1, L, r]; k_pe [B, 1, L, rope]"""
        return self.split_rope(*self.projections(x, norm), offset)

    def projections(self, x: mx.array, norm=None):
        """x: [B, L, D] -> q [B, L, H * q_head_dim], kv [B, L, kv_lora_rank + rope]"""
        q, kv = self.down_projections(x, norm)
        if self.q_lora_rank is not None:
            if self.fold_norms:
                q = norm_linear(self.q_b_proj, q, self.q_a_layernorm)
            else:
                q = self.q_b_proj(self.q_a_layernorm(q))
        return q, kv

    def split_rope(self, q: mx.array, kv: mx.array, offset=0):
        """projections() -> project()'s four arrays: heads split, latent normed, roped."""
        B, L, _ = q.shape
        q = q.reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)

        latent, k_pe = mx.split(kv, [self.kv_lora_rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]
        k_pe = k_pe.reshape(B, 1, L, self.qk_rope_head_dim)
        return q_nope, self.rope(q_pe, offset), latent, self.rope(k_pe, offset)

    def fusable_rows(self):
        """The two projections of the layer's input (layers/fused_rows.py stacks them)."""
        return self.q_projection(), self.kv_a_proj_with_mqa

    def q_projection(self):
        return self.q_proj if self.q_lora_rank is None else self.q_a_proj

    def down_projections(self, x: mx.array, norm=None):
        """x (or norm(x)) -> q LoRA input (q itself without a q LoRA), kv latent + rope: two
        projections of the same x, one launch where fused_rows stacked them."""
        fused = self.__dict__.get("fused_rows")
        if fused is not None:  # the kv part's width: the linears may be wrapped (bench)
            return split_call(fused, x, -(self.kv_lora_rank + self.qk_rope_head_dim), norm)
        first = self.q_projection()
        if norm is not None and not isinstance(first, KernelQuantizedLinear):
            x, norm = norm(x), None  # once, not per projection
        return norm_linear(first, x, norm), norm_linear(self.kv_a_proj_with_mqa, x, norm)

    def absorbed_queries(self, x: mx.array, offset=0, norm=None, rows=False):
        """project() with the queries moved into latent space (decode, MTP verification).
        x: [B, L, D] -> q_lat [B, H, L, r], q_pe (pre-scaled) [B, H, L, rope], latent, k_pe.
        rows: q_lat and q_pe as [B, 1, H * L, *] instead (cache_buffer's layout), which the
        kernels write directly for one sequence: no reshape nodes."""
        L = x.shape[1]
        if rows:
            fast = self.one_launch_queries(x, offset, norm)
            if fast is not None:
                return fast
        q, kv = self.projections(x, norm)
        fast = self.prepared(q, kv, offset, rows)
        if fast is None:
            q_nope, q_pe, latent, k_pe = self.split_rope(q, kv, offset)
            q_lat, q_pe = self.embed_q(q_nope), q_pe * self.scale
        else:
            q_nope, q_pe, latent, k_pe = fast  # q_pe comes scaled
            if q_nope.ndim == 3 and rows:  # [H, L, nope] (one sequence)
                q_lat = heads_linear(self.embed_q, q_nope, (1, 1, q_nope.shape[0] * L, None))
            elif q_nope.ndim == 3:  # no broadcasts in embed_q's matmul
                q_lat = self.embed_q(q_nope)[None]
            else:
                q_lat = self.embed_q(q_nope)
        if rows:
            q_lat, q_pe = as_rows(q_lat), as_rows(q_pe)
        return q_lat, q_pe, latent, k_pe

    def one_launch_backend(self, x) -> Optional[str]:
        """The backend whose MLA queries kernel (kernels/mla_queries.py) takes
        absorbed_queries(x, rows=True), or None. Its one-time check runs at the first call
        for a signature: outside any trace (compiled decode calls this at its eager first step)."""
        fused = self.__dict__.get("fused_rows")
        if fused is None or x.size != x.shape[-1] or self.q_lora_rank is None:
            return None
        backend = mla_queries.backend_for(self.queries_kernel)
        H, nope, P = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if backend is None or fused.weight.shape[0] != self.q_lora_rank + self.kv_lora_rank + P:
            return None
        if mla_queries.unsupported(x, self.q_b_proj, self.q_a_layernorm, self.embed_q,
                                   self.kv_a_layernorm, self.prep_rope, H, nope, P):
            return None
        sig = (H, self.q_lora_rank, nope, P, self.kv_lora_rank,
               mla_queries.quant_params(self.q_b_proj), mla_queries.embed_quant(self.embed_q),
               x.dtype, self.prep_rope.traditional)
        return backend if mla_queries.ready(backend, sig) else None

    def one_launch_queries(self, x, offset, norm=None):
        """absorbed_queries(x, offset, norm, rows=True) of one token of one sequence with all
        that follows the stacked down projections in one launch, or None where the MLA
        queries kernel does not apply."""
        backend = self.one_launch_backend(x)
        if backend is None:
            return None
        a = norm_linear(self.__dict__["fused_rows"], x, norm)  # [1, 1, q_a + latent + rope]
        return mla_queries.mla_queries(a, self.q_b_proj, self.q_a_layernorm, self.embed_q,
                                       self.kv_a_layernorm, self.prep_rope, offset,
                                       self.num_heads, self.qk_nope_head_dim,
                                       self.qk_rope_head_dim, self.scale, backend)

    def prepared(self, q, kv, offset, rows=False):
        """split_rope(q, kv, offset) with q_pe times the softmax scale, by the MLA prologue
        kernel (one launch) when it applies, else None. rows: q_pe as [B, 1, H * L, rope]."""
        backend = prep_backend(self.prep_kernel)
        H, nope, P = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if backend is None or self.prep_rope is None or mla_prep.unsupported(
                q, kv, self.kv_a_layernorm, H, nope, P):
            return None
        B, L, _ = q.shape
        sig = (B, L, H, nope, P, self.kv_lora_rank, q.dtype, self.prep_rope.traditional)
        if not prep_ready(backend, sig):
            return None
        return mla_prep.mla_prep(q, kv, self.kv_a_layernorm, offset, self.prep_rope, H, nope, P,
                                 self.scale, backend, rows)

    def attend(self, q, q_pe, k, v, k_pe, mask=None, valid=None):
        """SDPA of q over (k, v) plus the rope scores q_pe . k_pe, which ride in as the
        additive mask (with the causal mask folded in), so q/k may live in either space.
        valid: only the first `valid` keys count (the rest pad, see key_padding.py)."""
        # q: [B, H, L, dq], q_pe: [B, H, L, rope] (pre-scaled), k/v: [B, 1|H, S, *]
        out = None
        if valid is None:  # CPU, long caches: heads over two streams
            out = split_heads(self.attend_heads, q, q_pe, k, v, k_pe, mask)
        return out if out is not None else self.attend_heads(q, q_pe, k, v, k_pe, mask, valid)

    def attend_padded(self, q, q_pe, cache, latent, k_pe, mask=None):
        """attend() over the cache's keys, their count rounded up where that pays."""
        latent, k_pe, valid = padded_keys(cache, latent, k_pe, mask, self.pad_keys)
        if valid is None:  # attend() as the bench's variants may have replaced it
            return self.attend(q, q_pe, latent, latent, k_pe, mask)
        return self.attend(q, q_pe, latent, latent, k_pe, mask, valid=valid)

    def attend_heads(self, q, q_pe, k, v, k_pe, mask=None, valid=None):
        if k.shape[1] == 1 and q.shape[2] <= ABSORB_MAX_L and mla_scores.enabled(self.addmm_scores):
            return mla_scores.addmm_attention(q, q_pe, k, v, k_pe, self.scale, mask, valid)
        pe_scores = q_pe @ k_pe.swapaxes(-1, -2)  # [B, H, L, S]
        if valid is not None:
            pe_scores[..., valid:] = mx.array(-float("inf"), pe_scores.dtype)
        if mask is not None:
            neg = mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype)
            pe_scores = mx.where(mask, pe_scores, neg)
        if self.explicit_rows(*q.shape[1:3], k.shape[2], q.shape[0]):
            # The ops (and bf16 rounding) MLX's CUDA fallback uses for one query row too.
            scores = (q * self.scale) @ k.swapaxes(-1, -2) + pe_scores  # [B, H, L, S]
            return mx.softmax(scores, axis=-1, precise=True) @ v
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=pe_scores)

    def explicit_rows(self, H, L, S, B=1) -> bool:
        """Whether attention of L query rows over S keys (H heads, B sequences) runs as
        explicit matmul + softmax."""
        if L <= 1 or (L > ABSORB_MAX_L and (self.explicit_prefill is False
                                            or B * H * L * S > EXPLICIT_MAX_SCORES)):
            return False
        return explicit_attention()

    def decode_kernel(self, q_lat, q_pe, cache, mask, memo=None):
        """(backend, meta) when the MLA decode kernels take this step (cache already
        updated), else None: one query token, no mask, a plain KVCache. memo(key, make), when
        given, shares meta between the layers of a step (decode_compile.StepArrays)."""
        if mask is not None or q_lat.shape[2] != 1 or type(cache) is not KVCache:
            return None
        backend = decode_kernel_backend(self.mla_kernel, cache.offset)
        if backend is None:
            return None
        kv, kpe = cache.keys, cache.values
        if mla_decode.unsupported(q_lat, q_pe, kv, kpe):
            return None
        H, R, P = q_lat.shape[1], q_lat.shape[-1], q_pe.shape[-1]
        if not decode_kernel_ready(backend, (H, R, P, q_lat.dtype, kv.dtype)):
            return None
        def make():
            return mla_decode.decode_meta(cache.offset, kv.shape[2], H)
        return backend, make() if memo is None else memo(("meta", kv.shape[2], H), make)

    def kernel_attend(self, q_lat, q_pe, kv, kpe, meta, backend):
        # q_lat: [B, H, 1, r], kv / kpe: the whole cache buffers [B, 1, SM, *] -> [B, H, 1, r]
        scale = mla_decode.scale_array(self.scale)
        return mla_decode.mla_decode(q_lat, q_pe, kv, kpe, meta, scale, backend)

    def absorbed_output(self, out: mx.array, residual=None, rows=False) -> mx.array:
        # out: [B, H, L, r] over the latent (rows: [B, 1, H * L, r]) -> [B, L, D] (+ residual,
        # in o_proj's launch)
        if rows and out.shape[0] == 1 and out.shape[2] == self.num_heads:  # one token
            out = heads_linear(self.unembed_out, out, (1, 1, None))  # [1, 1, H * v]
            return norm_linear(self.o_proj, out, residual=residual)
        if rows:
            out = out.reshape(out.shape[0], self.num_heads, -1, out.shape[-1])
        B, H, L, r = out.shape
        if B == 1:  # per-head matmul over [H, L, r]: no broadcast nodes (3 of them at 4D)
            out = self.unembed_out(out.reshape(H, L, r))  # [H, L, v]
            if L > 1:
                out = out.swapaxes(0, 1)
            return norm_linear(self.o_proj, out.reshape(1, L, -1), residual=residual)
        out = self.unembed_out(out).transpose(0, 2, 1, 3).reshape(B, L, -1)  # [B, L, H*v]
        return norm_linear(self.o_proj, out, residual=residual)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Any = None):
        B, L, _ = x.shape  # x: [B, L, D]
        offset = cache.offset if cache is not None else 0
        if L <= ABSORB_MAX_L:
            q_lat, q_pe, latent, k_pe = self.absorbed_queries(x, offset)
            if cache is not None:
                latent, k_pe = cache.update_and_fetch(latent, k_pe)  # [B, 1, S, *]
            use = self.decode_kernel(q_lat, q_pe, cache, mask)
            if use is not None:
                out = self.kernel_attend(q_lat, q_pe, cache.keys, cache.values, use[1], use[0])
            else:
                out = self.attend_padded(q_lat, q_pe, cache, latent, k_pe, mask)
            return self.absorbed_output(out)

        # Long prefill: expanding K/V per head is cheaper than absorbing.
        q_nope, q_pe, latent, k_pe = self.project(x, offset)
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)
        k = self.embed_q(latent, transpose=False)  # [B, H, S, nope]
        v = self.unembed_out(latent)  # [B, H, S, v]
        out = self.attend_rows(q_nope, q_pe * self.scale, k, v, k_pe, mask)  # [B, H, L, v]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend_rows(self, q, q_pe, k, v, k_pe, mask=None):
        """attend() in blocks of query rows whose scores (B x H x rows x S) fit
        EXPLICIT_MAX_SCORES: the rope scores are a full array on every path, so this bounds a
        long prompt's prefill memory at long contexts (2048-row chunks at 128K keys would
        need 64 GiB), and on CUDA keeps every block on the explicit path."""
        # q: [B, H, L, dq], k/v: [B, H, S, *], mask: [L, S] or None -> [B, H, L, v]
        B, H, L, _ = q.shape
        rows = max(1, EXPLICIT_MAX_SCORES // (B * H * k.shape[2]))
        if rows >= L:
            return self.attend(q, q_pe, k, v, k_pe, mask)
        return mx.concatenate([
            self.attend(q[:, :, s:s + rows], q_pe[:, :, s:s + rows], k, v, k_pe,
                        None if mask is None else mask[..., s:s + rows, :])
            for s in range(0, L, rows)], axis=2)
