"""Two (or more) Macs over mlx.distributed: pipeline (layer ranges) or experts (expert ids).

    model, tokenizer = mlxkt.distributed.setup(path, "experts")   # rank 0 returns; others follow

Imports are lazy: `mlxkt launch --help` and `env_rank()` never load MLX.
"""

_LAZY = {
    "setup": "mlxkt.distributed.api",
    "env_rank": "mlxkt.distributed.api",
    "MODES": "mlxkt.distributed.api",
    "DistributedModel": "mlxkt.distributed.runtime",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlxkt.distributed' has no attribute {name!r}")


__all__ = list(_LAZY)
