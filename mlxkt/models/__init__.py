"""model_type registry: config.json's model_type -> module with Model and sanitize()."""

import importlib

from ..config import MODEL_TYPE_ALIASES, ModelArgs

MODELS = {
    "deepseek_v3": "mlxkt.models.deepseek",
    "deepseek_v2": "mlxkt.models.deepseek",
    "mixtral": "mlxkt.models.mixtral",
}


class UnsupportedModelError(ValueError):
    pass


def get_model_classes(config: dict):
    """(Model class, ModelArgs class) for a config; the hook mlx_lm.utils.load_model takes."""
    mt = config.get("model_type")
    mt = MODEL_TYPE_ALIASES.get(mt, mt)
    if mt not in MODELS:
        supported = ", ".join(sorted(set(MODELS) | set(MODEL_TYPE_ALIASES)))
        raise UnsupportedModelError(f"model_type {mt!r} is not supported (supported: {supported})")
    return importlib.import_module(MODELS[mt]).Model, ModelArgs
