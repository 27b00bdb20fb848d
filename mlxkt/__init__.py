"""mlxkt: DeepSeek-class mixture-of-experts inference on MLX.

Public API (imports are lazy so `mlxkt --help` stays instant):
    model, tokenizer = mlxkt.load(path)
    cache = mlxkt.make_cache(model)
    for r in mlxkt.stream_generate(model, tokenizer, prompt): ...
    model = mlxkt.optimize(model)   # mlxkt's kernels in any DeepSeek/Mixtral model, mlx-lm's too
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "mlxkt.loader",
    "make_cache": "mlxkt.loader",
    "generate": "mlxkt.generate",
    "stream_generate": "mlxkt.generate",
    "optimize": "mlxkt.inject",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlxkt' has no attribute {name!r}")


__all__ = list(_LAZY)
