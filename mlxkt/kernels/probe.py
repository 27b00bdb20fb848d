"""Random problems for checking the kernels against the reference (dispatch, selftest, tests)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from .moe import fused_routed_experts
from .reference import routed_experts_reference


def random_switch_linear(E, out_dims, in_dims, bits, group_size, dtype, key):
    """A QuantizedSwitchLinear with random packed words and realistic scales/biases."""
    layer = QuantizedSwitchLinear(group_size, 1, 1, bias=False, group_size=group_size, bits=bits)
    k1, k0, k2, k3 = mx.random.split(key, 4)
    groups = in_dims // group_size
    shape = (E, out_dims, in_dims * bits // 32)
    lo = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=k1)
    hi = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=k0)
    layer.weight = lo | (hi << 16)  # uniformly random packed words
    # Weights of about unit variance over the input dim, centred: w = s * (q - mid).
    scales = mx.random.uniform(0.5, 1.5, (E, out_dims, groups), key=k2)
    scales = scales * (3.0 / ((2**bits) * math.sqrt(in_dims)))
    layer.scales = scales.astype(dtype)
    jitter = mx.random.uniform(-0.5, 0.5, (E, out_dims, groups), key=k3)
    layer.biases = (-(2 ** (bits - 1)) + jitter) * scales
    layer.biases = layer.biases.astype(dtype)
    return layer


def random_problem(D, I, N, K, E, bits=(4, 4), group_size=(64, 64), dtype=mx.float32,
                   scale_dtype=None, seed=0, repeat=True):
    """x, inds, scores and gate/up/down layers; with repeat, tokens share experts."""
    key = mx.random.key(seed)
    kx, kg, ku, kd, ks = mx.random.split(key, 5)
    sd = scale_dtype or dtype
    gate = random_switch_linear(E, I, D, bits[0], group_size[0], sd, kg)
    up = random_switch_linear(E, I, D, bits[0], group_size[0], sd, ku)
    down = random_switch_linear(E, D, I, bits[1], group_size[1], sd, kd)
    rng = np.random.default_rng(seed)
    pool = E if not repeat else max(K, min(E, K + 1))  # a small pool forces shared experts
    choice = rng.choice(E, size=pool, replace=False)
    inds = np.stack([rng.choice(choice, size=K, replace=False) for _ in range(N)])
    x = mx.random.normal((N, D), key=kx).astype(dtype)
    scores = mx.random.uniform(0.1, 1.0, (N, K), key=ks)
    return x, mx.array(inds.astype(np.uint32)), scores, gate, up, down


def random_shared_expert(gate, up, down, seed=0):
    """A shared-expert MLP (layers.moe.MLP of nn.QuantizedLinear) quantized and shaped like one
    expert of gate/up/down."""
    from ..layers.moe import MLP  # the layers import the kernels

    keys = mx.random.split(mx.random.key(seed + 1000), 3)
    mlp = MLP(1, 1)
    for name, like, key in zip(("gate_proj", "up_proj", "down_proj"), (gate, up, down), keys):
        E, out_dims, words = like.weight.shape
        one = random_switch_linear(1, out_dims, words * 32 // like.bits, like.bits,
                                   like.group_size, like.scales.dtype, key)
        lin = nn.QuantizedLinear(like.group_size, 1, bias=False, group_size=like.group_size,
                                 bits=like.bits)
        lin.weight, lin.scales, lin.biases = one.weight[0], one.scales[0], one.biases[0]
        setattr(mlp, name, lin)
    return mlp


def shared_reference(x, shared, float32=False):
    """shared(x) (a random_shared_expert), or the same on float32 inputs and scales."""
    if not float32:
        return shared(x)

    def run(lin, v):
        return mx.quantized_matmul(v.astype(mx.float32), lin.weight, lin.scales.astype(mx.float32),
                                   lin.biases.astype(mx.float32), transpose=True,
                                   group_size=lin.group_size, bits=lin.bits)
    return run(shared.down_proj, nn.silu(run(shared.gate_proj, x)) * run(shared.up_proj, x))


def float32_copy(layer):
    """The same quantized layer with float32 scales and biases (the weights are shared)."""
    copy = QuantizedSwitchLinear(layer.group_size, 1, 1, bias=False, group_size=layer.group_size,
                                 bits=layer.bits)
    copy.weight = layer.weight
    copy.scales = layer.scales.astype(mx.float32)
    copy.biases = layer.biases.astype(mx.float32)
    return copy


def reference_float32(x, inds, scores, gate, up, down):
    """The reference on upcast inputs: what a bf16/fp16 kernel should be compared with."""
    y = routed_experts_reference(x.astype(mx.float32), inds, scores, float32_copy(gate),
                                 float32_copy(up), float32_copy(down))
    return y


def relative_error(a, b) -> float:
    a = np.array(a.astype(mx.float32), dtype=np.float64)
    b = np.array(b.astype(mx.float32), dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def probe(backend, signature) -> float:
    """Relative error of the kernels against the reference on random data of this signature
    (its optional last flag: a residual added by stage 2)."""
    D, I, N, K, (bg, gg), (bd, gd), dtype, sdt, _, with_shared, *rest = signature
    x, inds, scores, gate, up, down = random_problem(
        D, I, N, K, E=K + 1, bits=(bg, bd), group_size=(gg, gd), dtype=dtype, scale_dtype=sdt)
    shared = random_shared_expert(gate, up, down) if with_shared else None
    residual = mx.random.normal(x.shape, key=mx.random.key(7)).astype(dtype) if rest and rest[0] else None
    y = fused_routed_experts(x, inds, scores, gate, up, down, backend, shared, residual)
    ref = reference_float32(x, inds, scores, gate, up, down)
    if shared is not None:
        ref = ref + shared_reference(x, shared, float32=True)
    if residual is not None:
        ref = ref + residual.astype(mx.float32)
    mx.eval(y, ref)
    return relative_error(y, ref)
