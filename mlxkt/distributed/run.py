"""A small driver for tests and benchmarks: one process or every rank of a launch runs it.

    mlxkt launch -n 2 -- python -m mlxkt.distributed.run MODEL --mode experts --out r.json

Rank 0 writes JSON to --out: greedy tokens and their log-probabilities for a generation, a
two-turn chat (cache reuse and trimming) and two requests through the server engine, plus
speed and the bytes this rank reads per decoded token. --mode single loads the model in
one process with mlxkt.load (the reference). The other ranks write their byte counts to
--out.rank<N>.
"""

import argparse
import asyncio
import json
import sys
import time

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


def bytes_per_token(model, counter) -> dict:
    """Bytes of weights one decode step reads on this rank: every held tensor but the
    embedding (one row) and the routed experts, plus the (token, expert) pairs it ran."""
    from mlx.utils import tree_flatten

    from . import shard

    inner = getattr(model, "inner", model)
    dense = sum(a.nbytes for name, a in tree_flatten(inner.parameters())
                if "switch_mlp" not in name and "embed_tokens" not in name)
    blocks = [b for _, _, b in shard.moe_blocks(inner)]
    expert_bytes = 0
    if blocks:
        sw = blocks[0].switch_mlp
        sw = sw.inner if "inner" in sw else sw
        expert_bytes = sum(a.nbytes for _, a in tree_flatten(sw.parameters())) // sw.gate_proj.weight.shape[0]
    decode = [pairs for tokens, pairs in (counter or []) if tokens == 1]
    if counter is not None and decode:  # measured over the decode steps of the run
        pairs = sum(decode) / (len(decode) / len(blocks))
    else:  # every expert of the held layers: top-k distinct experts per MoE layer
        pairs = inner.args.num_experts_per_tok * len(blocks)
    return {"dense_bytes": dense, "expert_bytes": expert_bytes, "moe_layers": len(blocks),
            "expert_pairs_per_token": pairs, "bytes_per_token": int(dense + pairs * expert_bytes)}


def run_generate(model, tokenizer, max_tokens):
    from mlxkt.generate import stream_generate

    toks, lps, last = [], [], None
    for r in stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens):
        toks.append(r.token)
        lps.append(r.logprobs.tolist())
        last = r
    return {"tokens": toks, "logprobs": lps, "prompt_tps": last.prompt_tps,
            "generation_tps": last.generation_tps, "prompt_tokens": last.prompt_tokens}


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
    ap.add_argument("--scenarios", default="generate,chat,engine")
    ap.add_argument("--layers", default=None, help="pipeline: layers per rank, e.g. 2,1")
    ap.add_argument("--ignore-eos", action="store_true", help="generate max-tokens every time")
    args = ap.parse_args(argv)
    scenarios = args.scenarios.split(",")

    from . import api

    counter = [] if args.mode == "experts" else None

    def write_follower_stats(model):
        with open(f"{args.out}.rank{api.env_rank()}", "w") as f:
            json.dump({"bytes": bytes_per_token(model, counter)}, f)

    def load_fn():
        if args.mode == "single":
            import mlxkt

            model, tokenizer = mlxkt.load(args.model)
        else:
            model, tokenizer = api.setup(args.model, args.mode, layers=args.layers, counter=counter,
                                         on_follower_exit=write_follower_stats)
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
        result["generate"] = run_generate(model, tokenizer, args.max_tokens)
    if "chat" in scenarios:
        result["chat"] = run_chat(model, tokenizer, args.max_tokens)
    result["bytes"] = bytes_per_token(model, counter)
    if hasattr(model, "shutdown"):
        result["size"] = model.comm.size
        model.shutdown()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
