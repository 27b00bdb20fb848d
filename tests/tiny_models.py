"""Random tiny models built directly in MLX (no checkpoint), for engine tests."""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxkt.config import ModelArgs
from mlxkt.demo import DEMO_CONFIG
from mlxkt.models import get_model_classes

MIXTRAL_CONFIG = {
    "model_type": "mixtral", "vocab_size": 320, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
}


def random_model(config: dict, seed: int = 0):
    args = ModelArgs.from_dict(config)
    model_cls, _ = get_model_classes(config)
    return randomize(model_cls(args), seed)


def randomize(module, seed: int):
    """Float32 weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    mx.random.seed(seed)
    params = []
    for k, v in tree_flatten(module.parameters()):
        scale = 0.1 if k.endswith("bias") else (v.shape[-1] ** -0.5 if v.ndim > 1 else 0.1)
        base = 1.0 if k.endswith("norm.weight") else 0.0
        params.append((k, (base + scale * mx.random.normal(v.shape)).astype(mx.float32)))
    module.update(tree_unflatten(params))
    mx.eval(module.parameters())
    return module


def deepseek_tiny(seed=0):
    return random_model(DEMO_CONFIG, seed)


def quantized_tiny(seed=0):
    """The tiny V3 with 4-bit experts, shared experts, projections and per-head MLA linears
    (float32 activations), so that the fused expert, router and GEMV kernels can run on it."""
    import mlx.nn as nn
    from mlx_lm.models.mla import MultiLinear
    from mlx_lm.models.switch_layers import SwitchLinear

    model = deepseek_tiny(seed)
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: isinstance(m, (nn.Linear, SwitchLinear, MultiLinear))
                and m.weight.shape[-1] % 64 == 0)
    mx.eval(model.parameters())
    return model


def greedy_logits(model, steps=3, prompt=(5, 17, 3, 99, 42)):
    """The last-position logits of a prompt and of `steps` greedy decode steps: [steps+1, B, V]."""
    cache = model.make_cache()
    logits = model(mx.array([list(prompt)]), cache=cache)[:, -1]
    out = [logits]
    for _ in range(steps):
        logits = model(logits.argmax(-1)[:, None], cache=cache)[:, -1]
        out.append(logits)
    return mx.stack(out)


def mixtral_tiny(seed=0):
    return random_model(MIXTRAL_CONFIG, seed)


def attach_random_mtp(model, seed: int = 1):
    """Give a DeepSeek model a random MTP layer (as load_mtp would attach a real one)."""
    from mlxkt.mtp import MTP

    model.mtp = randomize(MTP(model.args, 1), seed)
    return model
