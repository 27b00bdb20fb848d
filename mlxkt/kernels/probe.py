"""Random problems for checking the kernels against the reference (dispatch, selftest, tests)."""

import math

import mlx.core as mx
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
    """Relative error of the kernels against the reference on random data of this signature."""
    D, I, N, K, (bg, gg), (bd, gd), dtype, sdt, _ = signature
    x, inds, scores, gate, up, down = random_problem(
        D, I, N, K, E=K + 1, bits=(bg, bd), group_size=(gg, gd), dtype=dtype, scale_dtype=sdt)
    y = fused_routed_experts(x, inds, scores, gate, up, down, backend)
    ref = reference_float32(x, inds, scores, gate, up, down)
    mx.eval(y, ref)
    return relative_error(y, ref)
