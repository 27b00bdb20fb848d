"""Decode steps of DeepSeek layers through mx.compile.

At decode sizes a GPU spends more time launching small kernels, and the host more time
building the graph, than reading weights. Two compiled pieces per layer cut both (MLX fuses
their elementwise ops and traces them once per shape):
  pre:  input norm, q/kv projections, rope (offset as an array: no retrace per position),
        queries absorbed into latent space;
  post: latent -> heads -> o_proj, residual, post-attention norm, MoE or MLP, residual.
The RMSNorms before the q/kv projections and both residual adds ride in the GEMV and expert
kernels' launches (norm_linear, RoutedExperts' residual): four kernels fewer per layer.
The cache update and attention over the cache stay eager, since their shapes grow; the MLA
decode kernels (kernels/mla_decode.py) read the whole cache buffer, so their call is
compiled too, traced once per buffer size.
On by default on NVIDIA GPUs: on an H100 it made decode 1.37-1.42x faster (8-layer
real-width slice, `mlxkt bench --variants eager`). Off on the CPU, where it gave only
1.02-1.08x, and on Apple GPUs until it is measured there. MLXKT_COMPILE=1/0 (or
load(compile=...)) overrides.
"""

import contextlib

import mlx.core as mx

from ..device import env_switch
from ..kernels.dispatch import gpu_backend
from ..loader_utils import eval_constants
from .mla import ABSORB_MAX_L
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

    def get(self, offset: int, key, make):
        if offset != self.offset:  # a new step (or the MTP layer's own position)
            self.offset, self.arrays = offset, {}
        if key not in self.arrays:
            arr = make()
            self.arrays[key] = arr + 0 if self.device_copy else arr
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
        def pre(x, offset):
            if not attn.fold_norms:
                return attn.absorbed_queries(layer.input_layernorm(x), offset)
            return attn.absorbed_queries(x, offset, norm=layer.input_layernorm)

        def post(out, x):
            if not attn.fold_norms:
                h = x + attn.absorbed_output(out)
                return h + layer.mlp(layer.post_attention_layernorm(h))
            h = attn.absorbed_output(out, residual=x)
            if isinstance(layer.mlp, DeepseekMoE):  # norm with the router, residual in stage 2
                return layer.mlp(h, residual=h, norm=layer.post_attention_layernorm)
            n = layer.post_attention_layernorm(h)
            if isinstance(layer.mlp, MLP):  # the residual rides in its down projection
                return layer.mlp(n, residual=h)
            return h + layer.mlp(n)

        self.pre = mx.compile(pre)
        self.post = mx.compile(post)
        # Traced once per cache buffer size (the valid length rides in `meta`).
        self.kernel_attend = {}

    def __call__(self, x, mask, cache):
        """The layer's output, or None when this call is not a primed decode-sized step."""
        L = x.shape[1]
        if cache is None or L > ABSORB_MAX_L:
            return None
        if L not in self.primed:
            # The first call per shape runs eagerly, so kernels that check themselves once
            # (mlxkt.kernels) do it outside a trace.
            self.primed.add(L)
            return None
        n = cache.offset
        # Shape (1,): what the MLA prologue kernel reads (a scalar would need a reshape node).
        pos = self.steps.get(n, "offset", lambda: mx.array([n], dtype=mx.int32))
        q_lat, q_pe, latent, k_pe = self.pre(x, pos)
        latent, k_pe = cache.update_and_fetch(latent, k_pe)  # [B, 1, S, *]
        use = self.attn.decode_kernel(q_lat, q_pe, cache, mask,
                                      lambda key, make: self.steps.get(n, key, make))
        if use is None:
            return self.post(self.attn.attend_padded(q_lat, q_pe, cache, latent, k_pe, mask), x)
        backend, meta = use
        if backend not in self.kernel_attend:
            self.kernel_attend[backend] = mx.compile(
                lambda q, qpe, kv, kpe, m: self.attn.kernel_attend(q, qpe, kv, kpe, m, backend))
        out = self.kernel_attend[backend](q_lat, q_pe, cache.keys, cache.values, meta)
        return self.post(out, x)


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
