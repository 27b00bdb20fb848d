"""Decode steps of DeepSeek layers through mx.compile.

At decode sizes a GPU spends more time launching small kernels, and the host more time
building the graph, than reading weights. Two compiled pieces per layer cut both (MLX fuses
their elementwise ops and traces them once per shape):
  pre:  input norm, q/kv projections, rope (offset as an array: no retrace per position),
        queries absorbed into latent space;
  post: latent -> heads -> o_proj, residual, post-attention norm, MoE or MLP, residual.
The RMSNorms before the q/kv projections and both residual adds ride in the GEMV and expert
kernels' launches (norm_linear, RoutedExperts' residual): four kernels fewer per layer.
Between them, a one-token step writes the cache in place, then attends over its whole
buffer in a third compiled piece, traced once per buffer size (layers/cache_buffer.py; on CUDA);
otherwise the cache update and attention stay eager, since their shapes grow. The MLA
decode kernels (kernels/mla_decode.py) read the whole cache buffer too, so their call is
compiled, traced once per buffer size.
On by default on NVIDIA GPUs: on an H100 it made decode 1.37-1.42x faster (8-layer
real-width slice, `mlxkt bench --variants eager`). Off on the CPU, where it gave only
1.02-1.08x, and on Apple GPUs until it is measured there. MLXKT_COMPILE=1/0 (or
load(compile=...)) overrides.
"""

import contextlib
from functools import partial

import mlx.core as mx

from ..device import env_switch
from ..kernels.dispatch import gpu_backend
from ..loader_utils import eval_constants
from . import cache_buffer
from .mla import ABSORB_MAX_L, decode_kernel_backend
from .moe import MLP, DeepseekMoE

ENV = "MLXKT_COMPILE"


def compile_default() -> bool:
    forced = env_switch(ENV)
    if forced is None:
        return gpu_backend() == "cuda"
    return forced


class StepArrays:
    """Small device arrays that every layer of one decode step needs alike (the position for
    rope, the MLA kernels' meta), made once per step for all the layers of a model instead
    of once per layer: each host-made array is one more host-to-device transfer, and a
    kernel's first read of it costs the GPU ~10 µs (H200, managed memory).

    With `device_copy` (the default on CUDA) each is copied once by a GPU op (`+ 0`) and the
    layers read the copy: MLX CUDA keeps host-made scalars in a shared pool of managed memory
    that the host writes again while the GPU runs the step, so every layer's read of the
    original may fault its page back (the MLA prologue kernel, which reads the position,
    took 9-13 µs per call on H100/H200 for a few KB of work)."""

    def __init__(self, device_copy: bool = False):
        self.offset = None
        self.arrays = {}
        self.device_copy = device_copy

    def get(self, offset: int, key, make, copy: bool = True):
        """make() once per step; copy=False for arrays a GPU op makes (no host pages)."""
        if offset != self.offset:  # a new step (or the MTP layer's own position)
            self.offset, self.arrays = offset, {}
        if key not in self.arrays:
            arr = make()
            self.arrays[key] = arr + 0 if self.device_copy and copy else arr
        return self.arrays[key]


class CompiledDecode:
    """The compiled decode path of one DecoderLayer (held as a plain attribute, so the
    layer's parameters and their names stay as they are)."""

    def __init__(self, layer, steps: StepArrays = None):
        attn = layer.self_attn
        self.attn = attn
        self.primed = set()
        self.steps = steps or StepArrays()

        # attn.fold_norms is read when a shape is traced (the bench's "no-fold" sets it first).
        # rows: the queries and the attention's output in cache_buffer's layout.
        def pre(x, offset, rows):
            if not attn.fold_norms:
                return attn.absorbed_queries(layer.input_layernorm(x), offset, rows=rows)
            return attn.absorbed_queries(x, offset, norm=layer.input_layernorm, rows=rows)

        def post(out, x, rows):
            if not attn.fold_norms:
                h = x + attn.absorbed_output(out, rows=rows)
                return h + layer.mlp(layer.post_attention_layernorm(h))
            h = attn.absorbed_output(out, residual=x, rows=rows)
            if isinstance(layer.mlp, DeepseekMoE):  # norm with the router, residual in stage 2
                return layer.mlp(h, residual=h, norm=layer.post_attention_layernorm)
            n = layer.post_attention_layernorm(h)
            if isinstance(layer.mlp, MLP):  # the residual rides in its down projection
                return layer.mlp(n, residual=h)
            return h + layer.mlp(n)

        self.pre = {r: mx.compile(partial(pre, rows=r)) for r in (False, True)}
        self.post = {r: mx.compile(partial(post, rows=r)) for r in (False, True)}
        # Traced once per cache buffer size (the valid length rides in `meta`).
        self.kernel_attend = {}
        # ((buffer rows, static write), its compiled piece of cache_buffer): only the current
        # size's traces are kept.
        self.buffered = (None, None)

    def __call__(self, x, mask, cache):
        """The layer's output, or None when this call is not a primed decode-sized step."""
        L = x.shape[1]
        if cache is None or L > ABSORB_MAX_L:
            return None
        if L not in self.primed:
            # The first call per shape runs eagerly, so kernels that check themselves once
            # (mlxkt.kernels) do it outside a trace: the eager layer checks its own, and the
            # MLA queries kernel, which only the compiled step runs, is checked here.
            self.primed.add(L)
            self.attn.one_launch_backend(x)
            return None
        n = cache.offset
        # Shape (1,): what the MLA prologue kernel reads (a scalar would need a reshape node).
        pos = self.steps.get(n, "offset", lambda: mx.array([n], dtype=mx.int32))
        if self.buffer_step(cache, mask, L):
            q_lat, q_pe, latent, k_pe = self.pre[True](x, pos)
            return self.post[True](self.attend_buffer(q_lat, q_pe, latent, k_pe, cache, pos), x)
        q_lat, q_pe, latent, k_pe = self.pre[False](x, pos)
        latent, k_pe = cache.update_and_fetch(latent, k_pe)  # [B, 1, S, *]
        use = self.attn.decode_kernel(q_lat, q_pe, cache, mask,
                                      lambda key, make: self.steps.get(n, key, make))
        if use is None:
            out = self.attn.attend_padded(q_lat, q_pe, cache, latent, k_pe, mask)
            return self.post[False](out, x)
        backend, meta = use
        if backend not in self.kernel_attend:
            self.kernel_attend[backend] = mx.compile(
                lambda q, qpe, kv, kpe, m: self.attn.kernel_attend(q, qpe, kv, kpe, m, backend))
        out = self.kernel_attend[backend](q_lat, q_pe, cache.keys, cache.values, meta)
        return self.post[False](out, x)

    def buffer_step(self, cache, mask, L) -> bool:
        """Whether this step attends over the cache buffer (cache_buffer.py): one token into
        a plain KVCache, unless the MLA decode kernels take it."""
        attn = self.attn
        return (cache_buffer.applies(cache, mask, L) and cache_buffer.enabled(attn.buffer_attention)
                and decode_kernel_backend(attn.mla_kernel, cache.offset + L) is None)

    def attend_buffer(self, q_lat, q_pe, latent, k_pe, cache, pos):
        """The new entries written at pos, attention over the whole buffer.
        q_lat / q_pe: [B, 1, H, *] -> [B, 1, H, r]"""
        n, L = cache.offset, latent.shape[2]
        cache_buffer.reserve(cache, latent, k_pe)
        rows, static = cache.keys.shape[2], self.attn.static_cache_write
        if self.buffered[0] != (rows, static):  # a new size: a new trace, the old one dropped
            scale = self.attn.scale
            piece = cache_buffer.attend_buffer if static else cache_buffer.write_and_attend
            self.buffered = ((rows, static), mx.compile(lambda *a: piece(*a, scale=scale)))
        H = q_pe.shape[2]
        bias = self.steps.get(n, ("bias", rows, H),
                              lambda: cache_buffer.key_bias(rows, H, q_pe.dtype)(pos), copy=False)
        if static:  # eager writes at a known offset (SliceUpdate), only the attention compiled
            cache.keys[..., n:n + L, :] = latent
            cache.values[..., n:n + L, :] = k_pe
            out = self.buffered[1](q_lat, q_pe, cache.keys, cache.values, bias)
        else:
            out, cache.keys, cache.values = self.buffered[1](
                q_lat, q_pe, latent, k_pe, cache.keys, cache.values, pos, bias)
        cache.offset += L
        return out


def set_compiled_decode(model, on: bool = True) -> None:
    """Turn the compiled decode path of every DeepSeek decoder layer (MTP layers too) on or off."""
    if on:  # before any trace: a lazy constant would be recomputed in every step
        eval_constants(model)
    layers = list(getattr(model, "layers", []))
    if "mtp" in model:
        layers += list(model.mtp.layers)
    steps = StepArrays(device_copy=gpu_backend() == "cuda")  # shared by the model's layers
    for layer in layers:
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "absorbed_queries"):
            layer.compiled_decode = CompiledDecode(layer, steps) if on else None


@contextlib.contextmanager
def eager_decode(model):
    """Compiled decode off inside the block, as it was after it: a compiled step replays its
    trace, so Python-level hooks (counters, routing records) see nothing of it. Yields
    whether it was on."""
    layers = list(getattr(model, "layers", [])) + (list(model.mtp.layers) if "mtp" in model else [])
    was = any(getattr(layer, "compiled_decode", None) is not None for layer in layers)
    set_compiled_decode(model, False)
    try:
        yield was
    finally:
        if was:
            set_compiled_decode(model, True)
