"""Machine facts: memory, the Apple-GPU wired limit, and the on/off switches users set in the
environment."""

import contextlib
import os
import sys

import mlx.core as mx

OFF = ("0", "false", "off", "no")


def env_switch(name: str):
    """An on/off environment switch: None when unset, empty or "auto" (the caller's default),
    False for 0/false/off/no, True for anything else."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in OFF


def memory_bytes() -> int:
    """Memory a model may use: the recommended GPU working set on Apple, else RAM."""
    if mx.metal.is_available():
        return mx.device_info()["max_recommended_working_set_size"]
    if mx.cuda.is_available():
        return mx.device_info().get("memory_size", 0)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextlib.contextmanager
def wired_limit(model_bytes: int):
    """Wire the model's memory on Apple GPUs (as mlx-lm does) and say how to raise the limit."""
    if not mx.metal.is_available():
        yield
        return
    limit = mx.device_info()["max_recommended_working_set_size"]
    if model_bytes > 0.9 * limit:
        need_mb = int(model_bytes * 1.1) // 2**20
        print(
            f"[mlxkt] The model needs {model_bytes / 2**30:.1f} GiB, close to or above the "
            f"{limit / 2**30:.1f} GiB macOS lets the GPU wire. Raise it with:\n"
            f"  sudo sysctl iogpu.wired_limit_mb={need_mb}",
            file=sys.stderr,
        )
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)
