"""Does an MLX CUDA reduction over DeepSeek-V3's 129280-token vocabulary crash?

`mlxkt bench` died with an illegal memory access at the first decode step, whose new ops
over the isolated-op checks of bench_cuda_tails.py are the vocabulary-wide reductions of
sampling. Each case runs in its own process (an illegal access poisons the CUDA context).

    python benchmarks/cuda_vocab_ops.py
"""

import json
import subprocess
import sys

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
    out = {}
    for name, expr in CASES.items():
        try:
            p = subprocess.run([sys.executable, "-c", BODY.replace("{expr}", expr)],
                               capture_output=True, text=True, timeout=120)
            ok = p.returncode == 0 and "ok" in p.stdout
            out[name] = "ok" if ok else f"FAILED rc={p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
        except subprocess.TimeoutExpired:
            out[name] = "timeout"
        print(f"{name:26} {out[name]}", flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
