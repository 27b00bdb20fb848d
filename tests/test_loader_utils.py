"""Loader helpers: dequantizing the one-group layers that MLX's CUDA quantized matmul gets wrong."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

from mlxkt.demo import DEMO_CONFIG
from mlxkt.kernels.dispatch import gpu_backend
from mlxkt.loader_utils import dense_one_group_layers
from tiny_models import random_model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.one = nn.QuantizedLinear(64, 32, bias=True, group_size=64, bits=4)  # one group per row
        self.two = nn.QuantizedLinear(128, 32, bias=False, group_size=64, bits=4)
        self.heads = QuantizedMultiLinear(64, 32, 4, group_size=64, bits=4, mode="affine")
        self.layers = [nn.QuantizedLinear(64, 16, bias=False, group_size=64, bits=8)]


def test_only_one_group_layers_become_dense_with_the_same_outputs():
    mx.random.seed(0)
    m = Block()
    x64 = mx.random.normal((7, 64))

    def outputs():  # on the CPU: its quantized matmul is right for these shapes, and exact
        with mx.stream(mx.cpu):
            ys = [m.one(x64), m.heads(x64[None, None]), m.layers[0](x64)]
            mx.eval(ys)
        return ys

    before = outputs()
    assert dense_one_group_layers(m) == 3
    assert isinstance(m.one, nn.Linear) and "bias" in m.one
    assert isinstance(m.two, nn.QuantizedLinear)  # two groups per row: untouched
    assert isinstance(m.heads, MultiLinear) and m.heads.weight.shape == (4, 32, 64)
    assert isinstance(m.layers[0], nn.Linear)
    after = outputs()
    for a, b in zip(before, after):
        assert mx.allclose(a, b, atol=1e-4).item()


@pytest.mark.gpu
@pytest.mark.skipif(gpu_backend() != "cuda", reason="the MLX bug is in its CUDA backend")
def test_a_kv_lora_64_model_prefills_on_cuda():
    """kv LoRA 64 at group 64: unembed_out's rows are one group. Without the fix a 67-token
    prefill raises and a 12-token one is wrong."""
    model = random_model(dict(DEMO_CONFIG, kv_lora_rank=64))
    nn.quantize(model, group_size=64, bits=4)
    assert isinstance(model.model.layers[0].self_attn.unembed_out, QuantizedMultiLinear)
    assert dense_one_group_layers(model) > 0
    tokens = mx.arange(3, 70)[None]  # [1, 67]
    for n in (12, 67):
        whole = model(tokens[:, :n], cache=model.make_cache())[0, -1]
        cache = model.make_cache()
        for i in range(n):  # one token at a time: the path MLX gets right
            step = model(tokens[:, i : i + 1], cache=cache)[0, -1]
        # Relative error: TF32 matmuls round at ~1e-3; the bug puts it near 1.
        err = (mx.linalg.norm(whole - step) / mx.linalg.norm(step)).item()
        assert err < 2e-2, (n, err)
