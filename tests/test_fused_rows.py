"""layers/fused_rows.py: two linears of one input stacked into one, without a second copy."""

import mlx.core as mx
import mlx.nn as nn

from mlxkt.kernels.qgemv import random_linear
from mlxkt.layers.fused_rows import fuse_rows, fuse_shared_inputs, split_call, unfuse
from mlxkt.layers.qlinear import KernelQuantizedLinear


def kernel_linear(O, D, bits=4, gs=64, seed=0):
    return KernelQuantizedLinear.wrap(random_linear(O, D, bits, gs, mx.float32, seed=seed))


def test_stacked_linear_computes_both_and_holds_no_second_copy():
    a, b = kernel_linear(96, 128), kernel_linear(40, 128, seed=1)
    x = mx.random.normal((3, 128))
    want_a, want_b = a(x), b(x)
    mx.eval(want_a, want_b)
    before = mx.get_active_memory()
    fused = fuse_rows(a, b)
    mx.eval(fused.parameters(), a.parameters(), b.parameters())
    grown = mx.get_active_memory() - before
    assert fused.weight.shape == (136, 128 * 4 // 32)
    got_a, got_b = split_call(fused, x, 96)
    assert mx.array_equal(got_a, want_a) and mx.array_equal(got_b, want_b)
    assert mx.array_equal(a(x), want_a) and mx.array_equal(b(x), want_b)  # views still right
    # the stacked arrays replace the old ones; at most one layer's worth is new
    assert grown <= sum(v.nbytes for v in fused.parameters().values()) + 4096


def test_only_like_layers_are_stacked():
    a = kernel_linear(64, 128)
    assert fuse_rows(a, kernel_linear(64, 128, bits=8, seed=1)) is None
    assert fuse_rows(a, kernel_linear(64, 256, seed=1)) is None
    plain = random_linear(64, 128)  # nn.QuantizedLinear: MLX's own path, left alone
    assert fuse_rows(a, plain) is None and fuse_rows(plain, plain) is None
    assert fuse_rows(nn.Linear(128, 64), nn.Linear(128, 64)) is None


def test_model_gives_the_same_logits_with_stacked_down_projections():
    from mlxkt.inject import optimize
    from tiny_models import greedy_logits as greedy, quantized_tiny

    model = quantized_tiny()
    optimize(model, rules=(), linears=True)  # on the CPU: MLX's quantized matmul inside
    want = greedy(model)
    assert fuse_shared_inputs(model) == len(model.layers)
    assert all("fused_rows" in vars(layer.self_attn) for layer in model.layers)
    assert "fused_rows" not in dict(model.layers[0].self_attn.items())  # not a parameter
    got = greedy(model)
    assert mx.array_equal(got.argmax(-1), want.argmax(-1))
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    unfuse(model)
    assert not any("fused_rows" in vars(layer.self_attn) for layer in model.layers)
    assert mx.allclose(greedy(model), want, atol=1e-4, rtol=1e-4).item()
