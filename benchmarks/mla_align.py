"""Does the decode attention's key count's alignment matter? Times MLX's plain MLA attention
(rope-score matmul + fused-SDPA fallback, as MLAttention.attend_heads) over S keys of a
cache buffer, for S a multiple of 8 and not. One query token, 128 heads, latent 512, rope 64."""

import sys
import time

import mlx.core as mx


def plain(q, q_pe, kv, kpe, S, scale, pad_to=1):
    Sp = -(-S // pad_to) * pad_to
    k, kp = kv[:, :, :Sp], kpe[:, :, :Sp]
    pe = q_pe @ kp.swapaxes(-1, -2)
    if Sp != S:
        pe[..., S:] = -float("inf")
    return mx.fast.scaled_dot_product_attention(q, k, k, scale=scale, mask=pe)


def main(lengths):
    H, R, P = 128, 512, 64
    rows = 33024
    caches = [(mx.random.normal((1, 1, rows, R)).astype(mx.bfloat16),
               mx.random.normal((1, 1, rows, P)).astype(mx.bfloat16)) for _ in range(4)]
    q = mx.random.normal((1, H, 1, R)).astype(mx.bfloat16)
    qp = mx.random.normal((1, H, 1, P)).astype(mx.bfloat16)
    mx.eval(caches, q, qp)
    for S in lengths:
        for pad in (1, 8, 64):
            f = lambda c: plain(q, qp, c[0], c[1], S, 0.07, pad)
            mx.eval([f(c) for c in caches])
            ts = []
            for _ in range(5):
                outs = [f(caches[i % 4]) for i in range(20)]
                t0 = time.perf_counter()
                mx.eval(outs)
                ts.append((time.perf_counter() - t0) / 20)
            ts.sort()
            ref = plain(q, qp, caches[0][0], caches[0][1], S, 0.07, 1)
            err = mx.abs(f(caches[0]) - ref).max().item()
            print(f"S={S:6d} pad={pad:3d} {ts[2] * 1e6:8.1f} us  max|diff| {err:.2e}", flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1].split(",")])
