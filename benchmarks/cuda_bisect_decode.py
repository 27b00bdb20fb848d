"""Bisect the CUDA illegal memory access of `mlxkt bench` (RESULTS.md) between loading from
files and building in memory, and between generate_step and step-by-step evaluation.
Each case runs in its own process. Usage: python benchmarks/cuda_bisect_decode.py WORKDIR"""

import sys

from isolate import run_isolated

SETUP = r'''
import sys, mlx.core as mx, mlxkt
from mlxkt.bench.synth import slice_config, build_model
from mlxkt.generate import generate_step
cfg = slice_config(layers=2, experts=32)
def loaded():
    return mlxkt.load(sys.argv[1], mtp=False)[0]
def built():
    return build_model(cfg)
'''
CASES = {
    "loaded_steps_512": "m = loaded(); c = m.make_cache(); p = mx.random.randint(0, 1000, (1, 513));"
                        "mx.eval(m(p[:, :512], cache=c)); mx.eval(m(p[:, 512:], cache=c))",
    "loaded_cache_only_then_step": "m = loaded(); c = m.make_cache(); p = mx.random.randint(0, 1000, (1, 513));"
                        "m(p[:, :512], cache=c); mx.eval([x.state for x in c]); mx.eval(m(p[:, 512:], cache=c))",
    "loaded_generate_513": "m = loaded(); print(list(t for t, *_ in generate_step(mx.random.randint(0, 1000, (513,)), m, max_tokens=2, mtp=False)))",
    "loaded_generate_64": "m = loaded(); print(list(t for t, *_ in generate_step(mx.random.randint(0, 1000, (64,)), m, max_tokens=2, mtp=False)))",
    "built_generate_513": "m = built(); print(list(t for t, *_ in generate_step(mx.random.randint(0, 1000, (513,)), m, max_tokens=2, mtp=False)))",
}


def main():
    workdir = sys.argv[1]
    from mlxkt.bench.synth import slice_config, write_model

    write_model(workdir, slice_config(layers=2, experts=32))
    run_isolated({n: SETUP + body + "\nmx.synchronize(); print('ok')" for n, body in CASES.items()},
                 timeout=90, args=(workdir,))


if __name__ == "__main__":
    main()
