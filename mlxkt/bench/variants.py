"""Experimental engine variants, applied to a loaded mlxkt model at run time so they can be
measured against the engine as it is, in the same run. Nothing here changes the engine's
files; what pays off is proposed to the lead as a diff.

- compile-mlp:   the post-attention block (norm + router + experts + shared + residual) of
                 each layer runs as one mx.compile'd function for decode-sized inputs.
- compile-layer: also the attention's input side (norm, q/kv projections, absorbed q,
                 rope with an array offset) and output side (unembed, o_proj, residual);
                 only the cache update, the score matmul and SDPA stay eager.
- mla-gemm:      compile-layer, with the decode attention over the latent cache written as
                 three GEMMs (all heads as rows) instead of a score matmul + masked SDPA.
- moe-segments:  prefill: tokens sorted by expert, then one dense quantized matmul per
                 expert on its contiguous slice (MLX's tensor-core qmm) instead of
                 gather_qmm; one host sync per MoE layer to learn the slice sizes.
"""

import mlx.core as mx
import mlx.nn as nn

from .measure import Engine

DECODE_MAX_L = 16  # same bound as the engine's absorbed-attention path


class _CompiledLayer(nn.Module):
    """A DeepSeek decoder layer whose decode-sized calls go through compiled pieces."""

    def __init__(self, layer, attention: bool, gemm: bool = False):
        super().__init__()
        self.layer = layer
        a = layer.self_attn
        object.__setattr__(self, "primed", set())
        object.__setattr__(self, "gemm", gemm)
        object.__setattr__(self, "post_fn", mx.compile(lambda out, x: self._post(out, x)))
        object.__setattr__(self, "mlp_fn", mx.compile(
            lambda h: h + layer.mlp(layer.post_attention_layernorm(h))))
        object.__setattr__(self, "pre_fn", mx.compile(lambda x, off: self._pre(x, off))
                           if attention else None)
        object.__setattr__(self, "a", a)

    def _pre(self, x, offset):
        a = self.a
        q_nope, q_pe, latent, k_pe = a.project(self.layer.input_layernorm(x), offset)
        return a.embed_q(q_nope), q_pe * a.scale, latent, k_pe

    def _post(self, out, x):
        a, B, L = self.a, x.shape[0], x.shape[1]
        o = a.unembed_out(out).transpose(0, 2, 1, 3).reshape(B, L, -1)  # [B, L, H*v]
        h = x + a.o_proj(o)
        return h + self.layer.mlp(self.layer.post_attention_layernorm(h))

    def __call__(self, x, mask=None, cache=None):
        L = x.shape[1]
        if L > DECODE_MAX_L or cache is None or L not in self.primed:
            # Eager the first time per shape: lets lazily built kernels probe outside a trace.
            if L <= DECODE_MAX_L:
                self.primed.add(L)
            return self.layer(x, mask, cache)
        if self.pre_fn is None:
            h = x + self.a(self.layer.input_layernorm(x), mask, cache)
            return self.mlp_fn(h)
        q_lat, q_pe, latent, k_pe = self.pre_fn(x, mx.array(cache.offset))
        latent, k_pe = cache.update_and_fetch(latent, k_pe)  # [B, 1, S, *]
        if self.gemm:
            return self.post_fn(_mla_gemm(q_lat, q_pe, latent, k_pe, self.a.scale, mask), x)
        scores = q_pe @ k_pe.swapaxes(-1, -2)  # [B, H, L, S]
        if mask is not None:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        out = mx.fast.scaled_dot_product_attention(
            q_lat, latent, latent, scale=self.a.scale, mask=scores)  # [B, H, L, r]
        return self.post_fn(out, x)


def _mla_gemm(q_lat, q_pe, latent, k_pe, scale, mask):
    """Absorbed MLA attention as three GEMMs over the shared latent: all heads' queries form
    the rows, so the cache is read once per GEMM instead of once per head."""
    # q_lat: [B, H, L, r], q_pe: [B, H, L, rope] (scaled), latent/k_pe: [B, 1, S, *]
    B, H, L, r = q_lat.shape
    ql = q_lat.reshape(B, 1, H * L, r) * scale
    qp = q_pe.reshape(B, 1, H * L, -1)
    scores = ql @ latent.swapaxes(-1, -2) + qp @ k_pe.swapaxes(-1, -2)  # [B, 1, H*L, S]
    if mask is not None:
        scores = scores.reshape(B, H, L, -1)
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        scores = scores.reshape(B, 1, H * L, -1)
    p = mx.softmax(scores, axis=-1, precise=True)
    return (p @ latent).reshape(B, H, L, r)


def _wrap_layers(engine: Engine, attention: bool, gemm: bool = False):
    layers = engine.model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = _CompiledLayer(layer, attention, gemm)


class _SegmentedExperts(nn.Module):
    """Routed experts with per-expert dense quantized matmuls for large token counts."""

    def __init__(self, inner, min_pairs: int):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "min_pairs", min_pairs)

    def __call__(self, x, inds, scores):
        # x: [..., D], inds/scores: [..., K] -> [..., D]
        if inds.size < self.min_pairs or not hasattr(self.inner.gate_proj, "scales"):
            return self.inner(x, inds, scores)
        m = self.inner
        lead, K, D = inds.shape[:-1], inds.shape[-1], x.shape[-1]
        E = m.gate_proj.weight.shape[0]
        flat = inds.reshape(-1)
        order = mx.argsort(flat)
        counts = (flat[:, None] == mx.arange(E)[None]).sum(axis=0).tolist()  # host sync
        xs = x.reshape(-1, D)[order // K]  # [N*K, D] grouped by expert
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            xe = xs[start : start + c]
            pad = _row_tile(c) - c
            if pad:  # keep MLX CUDA's qmm row tiles full (see _row_tile)
                xe = mx.concatenate([xe, mx.zeros((pad, D), xe.dtype)])
            g = _qmm(xe, m.gate_proj, e)
            u = _qmm(xe, m.up_proj, e)
            outs.append(_qmm(nn.silu(g) * u, m.down_proj, e)[:c])
            start += c
        y = mx.concatenate(outs)[mx.argsort(order)]  # back to (token, k) order
        w = scores.reshape(-1, K, 1).astype(y.dtype)
        return (y.reshape(-1, K, D) * w).sum(axis=1).reshape(*lead, D)


def _row_tile(m: int) -> int:
    """Rows rounded up to MLX CUDA qmm_sm80's row tile (a power of two from 16 to 64, then
    multiples of 64). A prefill chunk of 511 tokens x top-8 crashed MLX 0.32.4 CUDA with an
    illegal memory access (suspected partial row tile); padded rows cost little here."""
    if m <= 64:
        return max(16, 1 << (m - 1).bit_length())
    return -(-m // 64) * 64


def _qmm(x, layer, e):
    return mx.quantized_matmul(x, layer.weight[e], layer.scales[e], layer.biases[e],
                               transpose=True, group_size=layer.group_size, bits=layer.bits)


def _segments(engine: Engine, min_pairs: int = 256):
    for layer in engine.model.model.layers:
        layer = layer.layer if isinstance(layer, _CompiledLayer) else layer
        mlp = layer.mlp
        if "switch_mlp" in mlp:
            mlp.switch_mlp = _SegmentedExperts(mlp.switch_mlp, min_pairs)


VARIANTS = {
    "compile-mlp": lambda e: _wrap_layers(e, attention=False),
    "compile-layer": lambda e: _wrap_layers(e, attention=True),
    "mla-gemm": lambda e: _wrap_layers(e, attention=True, gemm=True),
    "moe-segments": _segments,
}


def apply_variant(engine: Engine, name: str) -> None:
    """Apply one variant, or several joined by '+' (e.g. compile-layer+moe-segments)."""
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ValueError(f"unknown variant {part!r} (known: {', '.join(sorted(VARIANTS))})")
        VARIANTS[part](engine)
    engine.name = f"mlxkt+{name}"
    engine.variant = name
    engine.decode_only = all(p != "moe-segments" for p in name.split("+"))
    engine.notes.append(f"variant {name}")
