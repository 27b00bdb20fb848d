"""What a prompt's short last chunk costs the first time (NVIDIA GPUs: kernels built on
first use), with mlxkt's chunking (a decode-sized last chunk joins the one before it; a
prompt of at most 17 tokens is prefilled token by token on CUDA) and without (the chunks
fed by hand). Needs a fresh process to mean anything.

    python benchmarks/prefill_tail.py --layers 8 --experts 32 --workdir /tmp/w8
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from mlxkt import loader  # noqa: E402
from mlxkt.bench.synth import slice_config, write_model_in_child  # noqa: E402
from mlxkt.generate import prefill  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/w8")
    a = ap.parse_args()
    path = write_model_in_child(Path(a.workdir) / f"synth-dsv3-{a.layers}l-{a.experts}e-4b",
                                slice_config("dsv3", a.layers, a.experts))
    model, _ = loader.load(path, mtp=False)
    p = mx.random.randint(0, 1000, (2048,))

    def seconds(fn) -> float:
        cache = model.make_cache()
        t0 = time.perf_counter()
        fn(cache)
        mx.eval([c.state for c in cache])
        return time.perf_counter() - t0

    def by_hand(*bounds):
        def f(cache):
            for s, e in zip(bounds[:-1], bounds[1:]):
                model(p[None, s:e], cache=cache)
                mx.eval([c.state for c in cache])
        return f

    def short(n: int, stepwise: str):
        def f(cache):
            os.environ["MLXKT_STEPWISE_PREFILL"] = stepwise
            prefill(model, p[: n + 1], cache)
            os.environ.pop("MLXKT_STEPWISE_PREFILL")
        return f

    rows = [  # each length new to the process, so each pays its first-use builds
        ("warm-up: 512 tokens", lambda c: prefill(model, p[:513], c)),
        ("512 tokens again", lambda c: prefill(model, p[:513], c)),
        ("518 tokens, mlxkt chunks (518)", lambda c: prefill(model, p[:519], c)),
        ("518 tokens as 512 + 6", by_hand(0, 512, 518)),
        ("1031 tokens, mlxkt chunks (512 + 519)", lambda c: prefill(model, p[:1032], c)),
        ("1031 tokens as 512 + 512 + 7", by_hand(0, 512, 1024, 1031)),
        ("the same again", by_hand(0, 512, 1024, 1031)),
        ("warm-up: 3 tokens, 1-token steps", short(3, "1")),  # decode's kernels, once
        ("7 tokens, 1-token steps", short(7, "1")),
        ("9 tokens as one chunk", short(9, "0")),
        ("12 tokens, 1-token steps", short(12, "1")),
        ("12 tokens as one chunk", short(12, "0")),
    ]
    res = {"device": str(mx.default_device()), "seconds": {}}
    for label, fn in rows:
        res["seconds"][label] = seconds(fn)
        print(f"{label:40} {res['seconds'][label]:8.2f} s", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
