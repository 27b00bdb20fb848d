"""mlxkt.optimize on models loaded by mlx-lm itself: same logits before and after the swap.

On the CPU the swapped blocks run the reference path, so this checks the module swap and the
routing glue; on a GPU the same test runs the fused kernels.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, load_model, quantize_model, save_config, save_model

import mlxkt.inject as opt
from mlxkt.kernels.dispatch import KernelFallbackWarning

DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 192, "moe_intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_shared_experts": 1,
    "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 64,
    "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 32,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3, "first_k_dense_replace": 1,
    "rms_norm_eps": 1e-6,
}
DEEPSEEK_V2 = {
    **DEEPSEEK_V3, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy",
    "scoring_func": "softmax", "q_lora_rank": None, "routed_scaling_factor": 1.0,
    "rope_scaling": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 2048},
}
MIXTRAL = {
    "model_type": "mixtral", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 1e6,
}


def saved_model(config, path, quantize=True):
    """A random tiny model written like an mlx-lm conversion, then loaded by mlx-lm."""
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    mx.random.seed(0)
    # Random routers too (mlx-lm starts DeepSeek gates at zero: every expert would tie).
    params = [(k, 0.3 * mx.random.normal(v.shape) if k.endswith(("gate.weight", "correction_bias"))
               else v) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    config = dict(config)
    if quantize:
        # Experts only: MLX 0.32.4's CUDA quantized matmul has no kernel for this tiny
        # model's 32-wide float32 attention layers, and the experts are what optimize swaps.
        model, config = quantize_model(model, config, group_size=32, bits=4,
                                       quant_predicate=lambda path, m: "switch_mlp" in path)
    save_model(path, model)
    save_config(config, path / "config.json")
    loaded, _ = load_model(path)
    return loaded


@pytest.mark.parametrize("config,blocks", [(DEEPSEEK_V3, 2), (DEEPSEEK_V2, 2), (MIXTRAL, 2)])
@pytest.mark.parametrize("length", [1, 6, 11])
@pytest.mark.filterwarnings("ignore::mlxkt.kernels.dispatch.KernelFallbackWarning")
def test_same_logits_after_optimize(tmp_path, config, blocks, length):
    model = saved_model(config, tmp_path)
    tokens = mx.array(np.random.default_rng(length).integers(0, 256, (1, length)))
    before = model(tokens)
    params = dict(tree_flatten(model.parameters()))
    assert opt.optimize(model) is model
    swapped = [m for _, m in model.named_modules() if isinstance(m, opt.KernelMoE)]
    assert len(swapped) == blocks
    after = model(tokens)
    # The swap keeps every parameter: same names, same arrays.
    now = dict(tree_flatten(model.parameters()))
    assert now.keys() == params.keys() and all(now[k] is params[k] for k in params)
    rel = float(mx.abs(after - before).max() / mx.abs(before).max())
    # On a GPU the fused kernels replace MLX's quantized matmuls: other rounding, same model.
    assert rel < (1e-4 if mx.default_device() == mx.cpu else 2e-3), rel


def test_optimize_leaves_other_modules_alone(tmp_path):
    model = saved_model(MIXTRAL, tmp_path, quantize=False)
    opt.optimize(model, rules=())
    assert not any(isinstance(m, opt.KernelMoE) for _, m in model.named_modules())
    # A rule whose path pattern does not match swaps nothing either.
    rule = opt.Rule(r"\.nothing$", opt.RULES[-1].cls, "mixtral")
    opt.optimize(model, rules=(rule,))
    assert not any(isinstance(m, opt.KernelMoE) for _, m in model.named_modules())


def test_unquantized_model_runs_reference(tmp_path):
    model = saved_model(MIXTRAL, tmp_path, quantize=False)
    tokens = mx.array([[3, 1, 4, 1, 5]])
    before = model(tokens)
    with pytest.warns(KernelFallbackWarning) if mx.default_device() == mx.gpu else _nothing():
        opt.optimize(model)
        after = model(tokens)
    assert float(mx.abs(after - before).max() / mx.abs(before).max()) < 1e-4


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_package_level_one_liner():
    import mlxkt

    assert mlxkt.optimize is opt.optimize
