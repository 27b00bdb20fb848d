"""Bisect the CUDA illegal memory access of `mlxkt bench` between the steps the bench adds to
a plain load + generate (RESULTS.md): prompt token ids over the whole vocabulary, the copy
bandwidth probe, a second engine loaded, the random cache fill, the bench loop itself.
Each case runs in its own process. Usage: python benchmarks/cuda_bisect_bench.py WORKDIR"""

import sys

from isolate import run_isolated

SETUP = r'''
import sys, mlx.core as mx, mlxkt
from mlxkt.bench import measure
from mlxkt.generate import generate_step
path = sys.argv[1]
V = 129280
def gen(m, ids):
    return list(t for t, *_ in generate_step(ids, m, max_tokens=2, mtp=False))
'''
CASES = {
    "warmup_low_ids": "m = mlxkt.load(path, mtp=False)[0]; print(gen(m, mx.random.randint(0, 1000, (65,))))",
    "high_ids": "m = mlxkt.load(path, mtp=False)[0]; print(gen(m, mx.random.randint(2, V, (65,))))",
    "high_ids_one_token": "m = mlxkt.load(path, mtp=False)[0]; print(gen(m, mx.array([V - 1])))",
    "embed_high_ids": "m = mlxkt.load(path, mtp=False)[0]; mx.eval(m.model.embed_tokens(mx.random.randint(2, V, (1, 65))))",
    "copy_bw_then_low_ids": "measure.copy_bandwidth(int(2e9)); m = mlxkt.load(path, mtp=False)[0]; print(gen(m, mx.random.randint(0, 1000, (65,))))",
    "engine_prefill": "e = measure.mlxkt_engine(path); print(measure.time_prefill(e, 64, V))",
    "engine_decode": "e = measure.mlxkt_engine(path); print(measure.time_decode(e, 64, 4))",
    "mlx_lm_prefill": "e = measure.mlx_lm_engine(path); print(measure.time_prefill(e, 64, V))",
    "both_engines_prefill": "l = measure.mlx_lm_engine(path); e = measure.mlxkt_engine(path); print(measure.time_prefill(e, 64, V))",
}


def main():
    workdir = sys.argv[1]
    from mlxkt.bench.synth import slice_config, write_model

    path = write_model(workdir, slice_config(layers=2, experts=32), 4, 64)
    first, *rest = CASES
    run_isolated({first: SETUP + CASES[first] + "\nmx.synchronize(); print('ok')"}, timeout=400,
                 args=(str(path),))
    run_isolated({n: SETUP + CASES[n] + "\nmx.synchronize(); print('ok')" for n in rest},
                 timeout=60, args=(str(path),))


if __name__ == "__main__":
    main()
