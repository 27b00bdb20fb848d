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
    model = model_cls(args)
    mx.random.seed(seed)
    params = []
    for k, v in tree_flatten(model.parameters()):
        scale = 0.1 if k.endswith("bias") else (v.shape[-1] ** -0.5 if v.ndim > 1 else 0.1)
        base = 1.0 if k.endswith("norm.weight") else 0.0
        params.append((k, (base + scale * mx.random.normal(v.shape)).astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def deepseek_tiny(seed=0):
    return random_model(DEMO_CONFIG, seed)


def mixtral_tiny(seed=0):
    return random_model(MIXTRAL_CONFIG, seed)


def attach_random_mtp(model, seed: int = 1):
    """Give a DeepSeek model a random MTP layer (as load_mtp would attach a real one)."""
    from mlxkt.mtp import MTP

    mtp = MTP(model.args, 1)
    mx.random.seed(seed)
    params = []
    for k, v in tree_flatten(mtp.parameters()):
        scale = 0.1 if k.endswith("bias") else (v.shape[-1] ** -0.5 if v.ndim > 1 else 0.1)
        base = 1.0 if k.endswith("norm.weight") else 0.0
        params.append((k, (base + scale * mx.random.normal(v.shape)).astype(mx.float32)))
    mtp.update(tree_unflatten(params))
    model.mtp = mtp
    mx.eval(mtp.parameters())
    return model
