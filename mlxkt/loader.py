"""mlxkt.load(path) -> (model, tokenizer) for converted MLX directories."""

import json
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model
from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

from .kernels.dispatch import gemv_enabled, kernel_backend
from .layers.decode_compile import compile_default, set_compiled_decode
from .loader_utils import cast_floats, dense_one_group_layers, mlx_cuda_one_group_bug
from .models import get_model_classes
from .mtp import load_mtp
from .safetensors_header import tensor_names


class ModelLoadError(RuntimeError):
    pass


def load_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    if not f.exists():
        raise ModelLoadError(f"{path}: no config.json here; is this a model directory?")
    return json.loads(f.read_text())


def check_converted(path: Path, config: dict) -> None:
    """Refuse Hugging Face release checkpoints with a message that says what to do."""
    names = tensor_names(path)
    if not names:
        raise ModelLoadError(f"{path}: no model*.safetensors weights found")
    qc = config.get("quantization_config") or {}
    released = (
        qc.get("quant_method") == "fp8"
        or any(n.endswith("weight_scale_inv") for n in names)
        or any(".experts.0." in n for n in names)
    )
    if released and "quantization" not in config and "mlxkt" not in config:
        raise ModelLoadError(
            f"{path} is a Hugging Face checkpoint, not an MLX one; convert it first:\n"
            f"  mlxkt convert {path} OUT_DIR"
        )


def load_tokenizer(path: Path, eos_token_ids=None) -> TokenizerWrapper:
    """mlx-lm's tokenizer wrapper, honouring tokenizer_config.json's add_bos_token and
    add_eos_token (transformers 5 ignores them for DeepSeek's tokenizers)."""
    f = Path(path) / "tokenizer_config.json"
    tc = json.loads(f.read_text()) if f.exists() else {}
    extra = {k: tc[k] for k in ("add_bos_token", "add_eos_token") if k in tc}
    return mlx_lm_load_tokenizer(path, tokenizer_config_extra=extra or None, eos_token_ids=eos_token_ids)


def default_dtype() -> Optional[mx.Dtype]:
    # MLX's CPU quantized matmul is ~8x faster with float32 activations than bfloat16.
    return mx.float32 if mx.default_device() == mx.cpu else None


def load(
    path, lazy: bool = False, dtype: Optional[mx.Dtype] = None, mtp: bool = True,
    compile: Optional[bool] = None,
) -> Tuple[nn.Module, TokenizerWrapper]:
    """Load a converted model. `mtp=True` attaches the MTP layer when the directory has one
    (generation then decodes speculatively). `compile`: decode steps through mx.compile
    (None: MLXKT_COMPILE, else on NVIDIA GPUs only; see layers/decode_compile.py)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model directory")
    config = load_config(path)
    check_converted(path, config)
    model, config = load_model(path, lazy=True, get_model_classes=get_model_classes)
    dtype = dtype or default_dtype()
    if dtype is not None:
        cast_floats(model, dtype, model.cast_predicate if hasattr(model, "cast_predicate") else None)
    if mtp:
        load_mtp(model, path, dtype)
    device_passes(model, compile)
    if not lazy:
        mx.eval(model.parameters())
    eos = config.get("eos_token_id")
    tokenizer = load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return model, tokenizer


def device_passes(model: nn.Module, compile: Optional[bool] = None) -> None:
    """Module swaps for the device, once the model's weights are in place (both loaders)."""
    if mlx_cuda_one_group_bug():  # MLX CUDA qmm is wrong or missing for one-group rows
        dense_one_group_layers(model)
    if gemv_enabled(kernel_backend()):  # dense linears through the GEMV kernel (CUDA)
        from .inject import optimize
        from .layers.fused_rows import fuse_shared_inputs

        optimize(model, rules=(), linears=True)
        fuse_shared_inputs(model)  # MLA's two input projections as one launch
    if compile_default() if compile is None else compile:
        set_compiled_decode(model)


def make_cache(model: nn.Module) -> list:
    return model.make_cache()
