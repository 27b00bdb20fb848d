"""mlxkt.convert: streaming conversion of Hugging Face DeepSeek / Mixtral checkpoints (FP8 or
bf16) into MLX directories that mlx-lm and mlxkt load, in memory bounded by one tensor chunk.

    from mlxkt.convert import convert, ConvertError
    convert("deepseek-ai/DeepSeek-R1", "R1-4bit", bits=4, group_size=64)
"""

__all__ = ["convert", "ConvertError"]


def __getattr__(name):
    # Lazy, so that `mlxkt --help` (which imports convert.cli) loads neither numpy nor MLX.
    if name == "convert":
        from .core import convert

        return convert
    if name == "ConvertError":
        from .errors import ConvertError

        return ConvertError
    raise AttributeError(f"module 'mlxkt.convert' has no attribute {name!r}")
