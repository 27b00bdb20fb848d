"""Does an MLX CUDA reduction over DeepSeek-V3's 129280-token vocabulary crash?

`mlxkt bench` died with an illegal memory access at the first decode step, whose new ops
over the isolated-op checks of bench_cuda_tails.py are the vocabulary-wide reductions of
sampling. Each case runs in its own process (an illegal access poisons the CUDA context).

    python benchmarks/cuda_vocab_ops.py
"""

from isolate import run_isolated

CASES = {
    "logsumexp_bf16_129280": "mx.logsumexp(x, axis=-1, keepdims=True)",
    "logsumexp_f32_129280": "mx.logsumexp(x.astype(mx.float32), axis=-1, keepdims=True)",
    "logsumexp_bf16_4096": "mx.logsumexp(x[:, :4096], axis=-1, keepdims=True)",
    "argmax_bf16_129280": "mx.argmax(x, axis=-1)",
    "softmax_bf16_129280": "mx.softmax(x, axis=-1)",
    "categorical_bf16_129280": "mx.random.categorical(x)",
    "lm_head_qmm_129280": "mx.quantized_matmul(h, *w, transpose=True, group_size=64, bits=4)",
}

BODY = r'''
import mlx.core as mx
x = mx.random.normal((1, 129280)).astype(mx.bfloat16)
h = mx.random.normal((1, 7168)).astype(mx.bfloat16)
w = mx.quantize(mx.random.normal((129280, 7168)).astype(mx.bfloat16) * 0.02, group_size=64, bits=4)
mx.eval(x, h, w)
y = {expr}
mx.eval(y)
mx.synchronize()
print("ok", y.shape)
'''


def main():
    run_isolated({name: BODY.replace("{expr}", expr) for name, expr in CASES.items()}, timeout=120)


if __name__ == "__main__":
    main()
