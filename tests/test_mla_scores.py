"""layers/mla_scores.py: decode attention scores by one addmm, against MLX's SDPA path."""

import mlx.core as mx
import pytest

from mlxkt.layers.mla_scores import addmm_attention


def sdpa(q, q_pe, k, v, k_pe, scale, mask=None, valid=None):
    pe = q_pe @ k_pe.swapaxes(-1, -2)
    if valid is not None:
        pe[..., valid:] = -float("inf")
    if mask is not None:
        pe = mx.where(mask, pe, mx.finfo(pe.dtype).min)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=pe)


@pytest.mark.parametrize("L,S,valid,masked", [(1, 37, None, False), (1, 40, 33, False),
                                               (3, 29, None, True), (2, 48, 45, True)])
def test_addmm_scores_match_sdpa(L, S, valid, masked):
    B, H, r, P = 2, 4, 32, 8
    k = mx.random.split(mx.random.key(L * S), 5)
    q = mx.random.normal((B, H, L, r), key=k[0])
    q_pe = mx.random.normal((B, H, L, P), key=k[1]) * 0.2
    lat = mx.random.normal((B, 1, S, r), key=k[2])
    k_pe = mx.random.normal((B, 1, S, P), key=k[3])
    if valid is not None:  # garbage past the valid keys must not count
        lat[:, :, valid:] = 1e4
    mask = None
    if masked:  # causal over the last L keys
        n = valid or S
        mask = (mx.arange(S)[None] <= mx.arange(n - L, n)[:, None])
    want = sdpa(q, q_pe, lat, lat, k_pe, 0.17, mask, valid)
    got = addmm_attention(q, q_pe, lat, lat, k_pe, 0.17, mask, valid)
    assert got.shape == (B, H, L, r)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
