"""Custom kernels (Metal, CUDA) with a plain-MLX reference, chosen at run time.

Exports load lazily so that `mlxkt --help` (which imports kernels.cli) does not load MLX."""

_EXPORTS = {
    "kernel_backend": "mlxkt.kernels.dispatch",
    "routed_experts": "mlxkt.kernels.dispatch",
    "routed_experts_reference": "mlxkt.kernels.reference",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlxkt.kernels' has no attribute {name!r}")
