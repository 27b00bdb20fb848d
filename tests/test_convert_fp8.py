"""FP8 e4m3 decoding (golden against torch on all 256 bytes), ragged 128x128 block scaling,
and row-chunked streaming giving the same bytes as whole-tensor processing."""

import math

import numpy as np
import pytest

from test_convert_synth import build, torch

from mlxkt.convert import convert
from mlxkt.convert import quantize as quantize_mod
from mlxkt.convert.fp8 import decode_e4m3, dequant_rows, dequant_rows_mx, e4m3_table


def test_all_256_bytes_match_torch():
    ref = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    ours = e4m3_table()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_array_equal(ours[~np.isnan(ref)], ref[~np.isnan(ref)])
    assert np.isnan(ref).sum() == 2
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(np.signbit(ours[ok]), np.signbit(ref[ok]))  # -0.0 included


@pytest.mark.parametrize("byte,value", [
    (0x00, 0.0), (0x38, 1.0), (0x3C, 1.5), (0x40, 2.0), (0x7E, 448.0), (0xFE, -448.0),
    (0x01, 2.0**-9), (0x07, 7 * 2.0**-9), (0x08, 2.0**-6), (0xB8, -1.0), (0x30, 0.5),
])
def test_golden_bytes(byte, value):
    assert decode_e4m3(np.array([byte], dtype=np.uint8))[0] == value


def test_nan_and_negative_zero():
    out = decode_e4m3(np.array([0x7F, 0xFF, 0x80], dtype=np.uint8))
    assert np.isnan(out[0]) and np.isnan(out[1])
    assert out[2] == 0.0 and np.signbit(out[2])


def test_matches_mlx_from_fp8():
    import mlx.core as mx

    b = np.arange(256, dtype=np.uint8)
    b = b[(b & 0x7F) != 0x7F]
    ref = np.array(mx.from_fp8(mx.array(b), dtype=mx.float32))
    np.testing.assert_array_equal(decode_e4m3(b), ref)


def reference_dequant(raw, scale, block=128):
    """Element by element: w[i, j] * scale[i // 128, j // 128]."""
    w = torch.from_numpy(raw).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(scale)
    i = torch.arange(w.shape[0])[:, None] // block
    j = torch.arange(w.shape[1])[None, :] // block
    return (w * s[i, j]).numpy()


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (1, 129), (257, 7), (384, 640)])
def test_ragged_blocks(shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, shape, dtype=np.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x38
    grid = tuple(math.ceil(d / 128) for d in shape)
    scale = rng.random(grid, dtype=np.float32) + 0.5
    whole = dequant_rows(raw, scale, 0)
    np.testing.assert_array_equal(whole, reference_dequant(raw, scale))
    # The MLX path the converter runs gives the same values.
    np.testing.assert_array_equal(np.array(dequant_rows_mx(raw, scale, 0)), whole)
    # A row chunk starting at a block boundary sees the same scales.
    if shape[0] > 128:
        np.testing.assert_array_equal(dequant_rows(raw[128:], scale, 128), whole[128:])
        np.testing.assert_array_equal(np.array(dequant_rows_mx(raw[128:], scale, 128)), whole[128:])


def test_chunk_must_start_on_block_boundary():
    with pytest.raises(AssertionError):
        dequant_rows(np.zeros((10, 10), np.uint8), np.ones((1, 1), np.float32), 5)


@pytest.mark.parametrize("fp8", [True, False])
def test_streaming_chunks_give_identical_output(tmp_path, monkeypatch, fp8):
    """Many small row chunks per tensor (ragged last chunk) == one chunk per tensor."""
    src = build(tmp_path / "src", "dsv3", fp8=fp8, vocab_size=700)
    whole = convert(src, tmp_path / "whole", progress=False)
    monkeypatch.setattr(quantize_mod, "CHUNK_ELEMS", 5000)  # < one 128-row FP8 block band
    chunked = convert(src, tmp_path / "chunked", progress=False)
    for f in sorted(whole.iterdir()):
        assert (chunked / f.name).read_bytes() == f.read_bytes(), f.name
