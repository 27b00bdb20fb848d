"""Which MLX CUDA op crashes on row counts that are not a multiple of the kernels' tile?

`mlxkt bench` on the H100 (MLX 0.32.4 CUDA, 8-layer real-width 4-bit slice) died with
"an illegal memory access was encountered" in mlxkt's prefill of a 511-token chunk, with and
without mlxkt's own kernels (MLXKT_KERNELS=0). A 512-token chunk ran in earlier sessions.
This script runs each suspect op at DeepSeek-V3 widths with a full and a ragged row count,
each case in its own process (an illegal access poisons the CUDA context), and prints JSON.

    python benchmarks/bench_cuda_tails.py            # on the GPU machine; ~2 min cold
"""

from isolate import run_isolated

CASES = {
    # dense quantized matmul (every linear of a prefill chunk): qmm_sm80 / qmm_sm90
    "qmm_511": "qmm(511)", "qmm_512": "qmm(512)",
    # sorted gather (routed experts of a prefill chunk: tokens x top-8 rows)
    "gather_sorted_4088": "gather(4088)", "gather_sorted_4096": "gather(4096)",
    # unsorted gather with many rows
    "gather_unsorted_4088": "gather(4088, sort=False)",
    # prefill attention with an additive mask (the MLA prefill path)
    "sdpa_511": "sdpa(511)", "sdpa_512": "sdpa(512)",
}

BODY = r'''
import mlx.core as mx
D, I, E = 7168, 2048, 32
def q(shape):
    w = mx.random.normal(shape).astype(mx.bfloat16) * 0.02
    return mx.quantize(w, group_size=64, bits=4)
def qmm(m):
    w, s, b = q((I, D))
    x = mx.random.normal((m, D)).astype(mx.bfloat16)
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4)
def gather(rows, sort=True):
    w, s, b = q((E, I, D))
    idx = mx.random.randint(0, E, (rows,)).astype(mx.uint32)
    if sort:
        idx = mx.sort(idx)
    x = mx.random.normal((rows, 1, D)).astype(mx.bfloat16)
    return mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4,
                         sorted_indices=sort)
def sdpa(L):
    q_ = mx.random.normal((1, 128, L, 128)).astype(mx.bfloat16)
    mask = mx.random.normal((1, 128, L, L)).astype(mx.bfloat16)
    return mx.fast.scaled_dot_product_attention(q_, q_, q_, scale=0.1, mask=mask)
y = {expr}
mx.eval(y)
mx.synchronize()
print("ok", y.shape)
'''


def main():
    run_isolated({name: BODY.replace("{expr}", expr) for name, expr in CASES.items()}, timeout=240)


if __name__ == "__main__":
    main()
