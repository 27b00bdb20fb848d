"""A small driver for tests and benchmarks: one process or every rank of a launch runs it.

    mlxkt launch -n 2 -- python -m mlxkt.distributed.run MODEL --mode experts --out r.json

Rank 0 writes JSON to --out: greedy tokens and their log-probabilities for a generation, a
two-turn chat (cache reuse and trimming) and two requests through the server engine, plus
speed and the bytes this rank reads per decoded token. --mode single loads the model in
one process with mlxkt.load (the reference). The other ranks write their byte counts to
--out.rank<N>.

Benchmark options: --warmup-tokens (an untimed generation first: MLX's GPU kernels compile
on first use), --repeats (timed generations, median speed), --logprobs token (keep only the
chosen token's log-probability: reading the whole vocabulary back per token would be timed),
--pairs routing (experts: rank 0 counts every rank's expert pairs from its own record of the
routing, instead of a host sync per MoE layer on every rank, which would slow the decode it
measures) and the scenario `allsum`: rank 0 counts the collectives of one decode step, then
every rank times an all_sum of each kind (ALLSUM_ITERS, each evaluated, median).
"""

import argparse
import asyncio
import json
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from ..layers.decode_compile import eager_decode

PROMPT = "The quick brown fox jumps over the lazy dog. Distributed inference on two Macs"


def write_model_dir(model, config: dict, out, quantize: bool = False):
    """Save an in-memory model as a converted directory (two shards + index, config, the
    demo tokenizer): what tests and benchmarks load on every rank."""
    from pathlib import Path

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxkt.demo import write_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if quantize:
        nn.quantize(model, group_size=64, bits=4,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
        config["quantization"] = {"group_size": 64, "bits": 4}
    weights = dict(tree_flatten(model.parameters()))
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        mx.save_safetensors(str(out / fname), {n: weights[n] for n in part})
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    write_tokenizer(out)
    return out


def bytes_per_token(model, counter, pairs=None) -> dict:
    """Bytes of weights one decode step reads on this rank: every held tensor but the
    embedding (one row) and the routed experts, plus the (token, expert) pairs it ran
    (`pairs` per token when given, else measured by `counter`, else top-k per MoE layer)."""
    from mlx.utils import tree_flatten

    from . import shard

    inner = getattr(model, "inner", model)
    dense = sum(a.nbytes for name, a in tree_flatten(inner.parameters())
                if "switch_mlp" not in name and "embed_tokens" not in name)
    blocks = [b for _, _, b in shard.moe_blocks(inner)]
    expert_bytes = 0
    if blocks:
        sw = blocks[0].switch_mlp
        while "inner" in sw:  # LocalExperts / RecordRouting wrappers
            sw = sw.inner
        expert_bytes = sum(a.nbytes for _, a in tree_flatten(sw.parameters())) // sw.gate_proj.weight.shape[0]
    decode = [n for tokens, n in (counter or []) if tokens == 1]
    if pairs is None and counter is not None and decode:  # measured over the decode steps of the run
        pairs = sum(decode) / (len(decode) / len(blocks))
    elif pairs is None:  # every expert of the held layers: top-k distinct experts per MoE layer
        pairs = inner.args.num_experts_per_tok * len(blocks)
    return {"dense_bytes": dense, "expert_bytes": expert_bytes, "moe_layers": len(blocks),
            "expert_pairs_per_token": pairs, "bytes_per_token": int(dense + pairs * expert_bytes)}


# --- routing record (--pairs routing) -------------------------------------------------------

class RoutingLog:
    """The expert ids of every routed-experts call on rank 0, kept as arrays (the forward
    evaluates them anyway: recording costs no host sync)."""

    def __init__(self):
        self.calls = []  # inds: [..., K]


class RecordRouting(nn.Module):
    """Wraps a block's switch_mlp and records its expert ids."""

    def __init__(self, inner: nn.Module, log: RoutingLog):
        super().__init__()
        self.inner = inner
        self.log = log  # a plain object: not a parameter

    def __call__(self, x, inds, scores, shared=None):
        # inds: [..., K], evaluated by the forward itself; kept as is (no new lazy node)
        self.log.calls.append(inds)
        return self.inner(x, inds, scores, shared)


def record_routing(model) -> RoutingLog:
    from . import shard

    log = RoutingLog()
    for _, _, block in shard.moe_blocks(getattr(model, "inner", model)):
        block.switch_mlp = RecordRouting(block.switch_mlp, log)
    return log


def pairs_by_rank(model, log: RoutingLog, size: int, tokens: list) -> list:
    """(token, expert) pairs per generated token that each rank's expert range ran, from one
    eager forward over the prompt and the generated tokens (compiled decode steps replay a
    trace, so they record nothing)."""
    from . import load, plan, shard

    inner = getattr(model, "inner", model)
    layers = len(list(shard.moe_blocks(inner)))
    if not tokens or not layers:
        return None
    log.calls.clear()
    with eager_decode(inner):
        mx.eval(model(mx.array(tokens)[None], model.make_cache()))
    ids = mx.concatenate([a.reshape(-1, a.shape[-1]) for a in log.calls], axis=0)  # [layers * L, K]
    E = load.num_experts(inner.args)
    out = []
    for k in range(size):
        lo, hi = plan.expert_range(E, k, size)
        out.append(((ids >= lo) & (ids < hi)).sum().item() / len(tokens))
    return out


# --- collectives (scenario allsum) ----------------------------------------------------------

def dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


class CountCollectives:
    """Counts the collectives issued through a Comm while active (wraps its methods; records
    op, shape, dtype; no host sync)."""

    OPS = ("all_sum", "send", "recv")

    def __init__(self, comm):
        self.comm, self.calls = comm, []

    def __enter__(self):
        for op in self.OPS:
            setattr(self.comm, op, self._wrap(op, getattr(self.comm, op)))
        return self

    def __exit__(self, *exc):
        for op in self.OPS:
            delattr(self.comm, op)  # the class's method again

    def _wrap(self, op, fn):
        def call(*args, **kwargs):
            shape, dtype = (args[0], args[1]) if op == "recv" else (args[0].shape, args[0].dtype)
            self.calls.append((op, list(shape), dtype_name(dtype)))
            return fn(*args, **kwargs)

        return call

    def summary(self) -> list:
        from collections import Counter

        counts = Counter((op, tuple(shape), dtype) for op, shape, dtype in self.calls)
        return [{"op": op, "shape": list(shape), "dtype": dtype, "count": n}
                for (op, shape, dtype), n in counts.items()]


def decode_collectives(model, tokenizer) -> list:
    """The collectives rank 0 issues for one decode token (after a prefill of PROMPT)."""
    cache = model.make_cache()
    logits = model(mx.array(tokenizer.encode(PROMPT))[None], cache)  # [1, L, vocab]
    tok = mx.argmax(logits[:, -1], axis=-1)  # [1]
    mx.eval(tok)
    # A compiled step replays its trace without calling all_sum from Python: count eagerly.
    with eager_decode(getattr(model, "inner", model)), CountCollectives(model.comm) as counted:
        mx.eval(model(tok[:, None], cache))
    return counted.summary()


ALLSUM_ITERS, ALLSUM_WARMUP = 200, 20


def time_allsum(comm, hidden: int, iters: int = ALLSUM_ITERS) -> list:
    """Median (and p10/p90) microseconds of one evaluated all_sum of each kind: the step
    message, and one token's hidden state in each activation dtype the model might use. Every
    rank of the group must call this at the same point."""
    import statistics

    from .runtime import HEAD, INLINE

    kinds = [([HEAD + INLINE], mx.int32)] + [([1, 1, hidden], dt) for dt in (mx.float32, mx.bfloat16, mx.float16)]
    out = []
    with comm.step("timing all_sum"):
        for shape, dtype in kinds:
            x = mx.ones(shape, dtype)
            mx.eval(x)
            times = []
            for i in range(ALLSUM_WARMUP + iters):
                t0 = time.perf_counter()
                mx.eval(mx.distributed.all_sum(x, group=comm.group))
                if i >= ALLSUM_WARMUP:
                    times.append((time.perf_counter() - t0) * 1e6)
            times.sort()
            out.append({"shape": shape, "dtype": dtype_name(dtype), "median_us": statistics.median(times),
                        "p10_us": times[len(times) // 10], "p90_us": times[len(times) * 9 // 10]})
    return out


def allsum_per_token(counted: list, timed: list) -> dict:
    """ms of all_sum per decode token = sum over kinds of (calls per token) x (median time)."""
    times = {(tuple(t["shape"]), t["dtype"]): t["median_us"] for t in timed}
    rows, total, moe = [], 0.0, 0.0
    for c in counted:
        if c["op"] != "all_sum":
            continue
        us = times.get((tuple(c["shape"]), c["dtype"]))
        rows.append(dict(c, median_us=us))
        if us is not None:
            total += c["count"] * us / 1e3
            if len(c["shape"]) == 3:  # a hidden state: the MoE layers' partial sums
                moe += c["count"] * us / 1e3
    return {"calls": rows, "ms_per_token": total, "moe_ms_per_token": moe,
            "all_matched": all(r["median_us"] is not None for r in rows)}


def find_comm(model):
    """The Comm a (rank > 0) model's distributed modules hold."""
    for _, m in model.named_modules():
        comm = getattr(m, "comm", None)
        if comm is not None:
            return comm
    return None


def run_generate(model, tokenizer, max_tokens, full_logprobs=True):
    from mlxkt.generate import stream_generate

    toks, lps, last = [], [], None
    for r in stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens):
        toks.append(r.token)
        lps.append(r.logprobs.tolist() if full_logprobs else r.logprobs[r.token])  # lazy: no sync
        last = r
    out = {"tokens": toks, "prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps,
           "prompt_tokens": last.prompt_tokens}
    if full_logprobs:
        out["logprobs"] = lps
    else:
        out["token_logprobs"] = mx.stack(lps).tolist()
    return out


def run_generates(model, tokenizer, args) -> dict:
    """A warm-up generation (untimed), then --repeats timed ones: the first's tokens and
    speeds, each run's speeds and their medians."""
    import statistics

    if args.warmup_tokens > 0:
        t0 = time.perf_counter()
        run_generate(model, tokenizer, args.warmup_tokens, full_logprobs=False)
        warmup_seconds = time.perf_counter() - t0
    runs = [run_generate(model, tokenizer, args.max_tokens, args.logprobs == "full")
            for _ in range(max(1, args.repeats))]
    out = dict(runs[0])
    if args.warmup_tokens > 0:
        out["warmup_seconds"] = warmup_seconds
    out["runs"] = [{"generation_tps": r["generation_tps"], "prompt_tps": r["prompt_tps"]} for r in runs]
    out["generation_tps_median"] = statistics.median(r["generation_tps"] for r in runs)
    out["prompt_tps_median"] = statistics.median(r["prompt_tps"] for r in runs)
    out["repeats_identical"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return out


def run_chat(model, tokenizer, max_tokens):
    from mlxkt.chat import ChatSession

    session = ChatSession(model, tokenizer)
    turns = []
    for text in ("Hello there, tell me a story.", "And another one, shorter."):
        turns.append([r.token for r in session.ask(text, max_tokens)])
    return turns


def run_engine(load_fn, max_tokens):
    """Two requests through the server's engine; the second extends the first (prefix reuse).
    -> (token lists, model, tokenizer); the model is built on the engine's thread."""
    import mlxkt
    from mlxkt.server.engine import Engine, Finish, Job, SamplingParams

    engine = Engine(load_fn, generate_fn=mlxkt.stream_generate, make_cache_fn=mlxkt.make_cache)
    engine.start()
    engine.context_length = 4096

    async def ask(tokens):
        h = engine.submit(Job(tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0)),
                          asyncio.get_running_loop())
        async for ev in h:
            if isinstance(ev, Finish):
                if ev.reason == "error":
                    raise RuntimeError(ev.error)
                return ev.tokens

    async def both():
        first = await ask(engine.tokenizer.encode(PROMPT))
        second = await ask(first + engine.tokenizer.encode(" And then?"))
        return [first, second]

    out = asyncio.run(both())
    engine.stop()
    return out, engine.model, engine.tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--mode", choices=["single", "pipeline", "experts"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--scenarios", default="generate,chat,engine", help="any of generate,chat,engine,allsum")
    ap.add_argument("--layers", default=None, help="pipeline: layers per rank, e.g. 2,1")
    ap.add_argument("--ignore-eos", action="store_true", help="generate max-tokens every time")
    ap.add_argument("--repeats", type=int, default=1, help="timed generations (speed: their median)")
    ap.add_argument("--warmup-tokens", type=int, default=0, help="an untimed generation of this length first")
    ap.add_argument("--logprobs", choices=["full", "token"], default="full")
    ap.add_argument("--pairs", choices=["sync", "routing"], default="sync",
                    help="experts: count expert pairs with a host sync per MoE layer on each rank, "
                         "or on rank 0 from its record of the routing (no sync)")
    args = ap.parse_args(argv)
    scenarios = args.scenarios.split(",")

    from . import api

    counter = [] if args.mode == "experts" and args.pairs == "sync" else None
    routing = None

    def write_follower_stats(model, follow_stats=None):
        stats = {"bytes": bytes_per_token(model, counter), "follow": follow_stats}
        if args.mode == "experts" and args.pairs == "routing":  # rank 0's pairs_by_rank has them
            stats["bytes"].update(expert_pairs_per_token=None, bytes_per_token=None)
        comm = find_comm(model)
        if "allsum" in scenarios and comm is not None and comm.size > 1:
            stats["allsum_timed"] = time_allsum(comm, model.args.hidden_size)  # with rank 0
        with open(f"{args.out}.rank{api.env_rank()}", "w") as f:
            json.dump(stats, f)

    def load_fn():
        nonlocal routing
        if args.mode == "single":
            import mlxkt

            model, tokenizer = mlxkt.load(args.model)
        else:
            model, tokenizer = api.setup(args.model, args.mode, layers=args.layers, counter=counter,
                                         on_follower_exit=write_follower_stats, batch=True)
        if args.mode == "experts" and args.pairs == "routing":
            routing = record_routing(model)
        if args.ignore_eos:
            tokenizer.eos_token_ids = []
        return model, tokenizer

    if args.mode != "single" and api.env_rank() != 0:
        load_fn()  # follows rank 0's calls, then exits
    result, model, tokenizer = {"mode": args.mode}, None, None
    t0 = time.perf_counter()
    if "engine" in scenarios:  # the server's way: the model is built on the engine's thread
        result["engine"], model, tokenizer = run_engine(load_fn, args.max_tokens)
    if model is None:
        model, tokenizer = load_fn()
    result["load_seconds"] = time.perf_counter() - t0
    if "generate" in scenarios:
        result["generate"] = run_generates(model, tokenizer, args)
    if "chat" in scenarios:
        result["chat"] = run_chat(model, tokenizer, args.max_tokens)
    comm = getattr(model, "comm", None)
    if "allsum" in scenarios and comm is not None:  # before shutdown: the other ranks follow
        result["collectives_per_token"] = decode_collectives(model, tokenizer)
    pairs = None
    if routing is not None:
        generated = result.get("generate", {}).get("tokens", [])
        result["pairs_by_rank"] = pairs_by_rank(model, routing, comm.size,
                                                tokenizer.encode(PROMPT) + generated)
        pairs = result["pairs_by_rank"] and result["pairs_by_rank"][0]
    result["bytes"] = bytes_per_token(model, counter, pairs)
    if hasattr(model, "shutdown"):
        result["size"] = comm.size
        model.shutdown()
        if "allsum" in scenarios and comm.size > 1:  # the other ranks time it as they exit
            timed = time_allsum(comm, model.args.hidden_size)
            result["allsum"] = dict(allsum_per_token(result["collectives_per_token"], timed),
                                    timed=timed, iterations=ALLSUM_ITERS)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
