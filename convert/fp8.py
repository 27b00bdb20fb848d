"""FP8 e4m3 (the `float8_e4m3fn` of DeepSeek's releases) decoding and 128x128 block scaling."""

import mlx.core as mx
import numpy as np


def e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn bytes: 1 sign, 4 exponent (bias 7), 3 mantissa.

    No infinities; exponent 15 with mantissa 7 is NaN; exponent 0 is subnormal.
    """
    b = np.arange(256, dtype=np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = (man / 8.0) * 2.0**-6
    val = sign * np.where(exp == 0, subnormal, normal)
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


def decode_e4m3(raw: np.ndarray, table: np.ndarray = None) -> np.ndarray:
    """raw: uint8 [...] -> float32 [...]"""
    table = e4m3_table() if table is None else table
    return table[raw]


def dequant_rows(raw: np.ndarray, scale_inv: np.ndarray, row0: int, block=(128, 128),
                 table: np.ndarray = None) -> np.ndarray:
    """Dequantize rows [row0, row0 + n) of a block-scaled FP8 weight.

    raw: uint8 [n, C]; scale_inv: float32 [ceil(R/br), ceil(C/bc)] of the whole weight (edge
    blocks are ragged); row0 must be a multiple of br. Returns float32 [n, C] = w * scale.
    """
    br, bc = block
    assert row0 % br == 0, "row chunks must start on a block boundary"
    n, C = raw.shape
    w = decode_e4m3(raw, table)
    # One scale per column block, expanded along the columns: [row blocks, C].
    cols = np.repeat(scale_inv.astype(np.float32), bc, axis=1)[:, :C]
    for i in range(0, n, br):
        w[i : i + br] *= cols[(row0 + i) // br]
    return w


def dequant_rows_mx(raw: np.ndarray, scale_inv: np.ndarray, row0: int, block=(128, 128)) -> mx.array:
    """dequant_rows in MLX (mx.from_fp8; on the GPU where there is one): float32 [n, C].

    Same values as dequant_rows: e4m3 is exact in float32 and the product is one rounding.
    """
    br, bc = block
    assert row0 % br == 0, "row chunks must start on a block boundary"
    n, C = raw.shape
    pad = -n % br  # ragged last band: pad to whole blocks, cut after
    if pad:
        raw = np.concatenate([raw, np.zeros((pad, C), np.uint8)])
    cols = np.repeat(scale_inv.astype(np.float32), bc, axis=1)[:, :C]  # [row blocks, C]
    b0 = row0 // br
    s = mx.array(cols[b0 : b0 + (n + pad) // br])  # [nb, C]
    w = mx.from_fp8(mx.array(raw), dtype=mx.float32).reshape(-1, br, C) * s[:, None, :]
    return w.reshape(-1, C)[:n]
