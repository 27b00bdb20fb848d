"""Engine plumbing with an injected generation function: a generation that fails mid-way
reaches the client as a structured error (and the server goes on), waiting jobs that are
cancelled never run, stop() ends everything. Also top_p/top_k reach the real sampler."""

import asyncio
import threading
from types import SimpleNamespace

import httpx
import pytest

from test_serve_common import MODEL, base_state, serve, wait_idle  # noqa: F401 (fixtures)


class ScriptedGeneration:
    """Stands in for mlxkt.stream_generate: yields `n` one-character pieces, then either
    finishes or raises; `gate` (if set) holds each call until released."""

    def __init__(self, n=5, fail=False):
        self.n, self.fail = n, fail
        self.calls = []
        self.gate = None

    def __call__(self, model, tokenizer, prompt, max_tokens, prompt_cache=None, **kw):
        self.calls.append(list(prompt))
        if self.gate is not None:
            self.gate.wait(30)
        for i in range(min(self.n, max_tokens)):
            if self.fail and i == 2:
                raise RuntimeError("device lost")
            last = i + 1 == min(self.n, max_tokens)
            yield SimpleNamespace(text="ab"[i % 2], token=100 + i,
                                  finish_reason=("length" if last else None))


def scripted_state(base_state, gen):
    from mlxkt.server.engine import Engine
    from mlxkt.server.service import ServerState

    engine = Engine(lambda: (None, base_state.tokenizer), generate_fn=gen, make_cache_fn=lambda m: [],
                    sampling_fn=lambda p: {}, context_length=base_state.engine.context_length, max_queue=4)
    engine.start()
    return ServerState(engine, base_state.tokenizer, base_state.settings, base_state.info)


@pytest.fixture
def failing(base_state):
    gen = ScriptedGeneration(n=5, fail=True)
    state = scripted_state(base_state, gen)
    s = serve(state)
    yield s, gen
    s.stop()
    state.engine.stop()


def test_generation_error_is_reported_and_server_continues(failing):
    s, gen = failing
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    r = httpx.post(f"{s.url}/v1/chat/completions", json=body)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "generation_error" and "device lost" in r.json()["error"]["message"]
    raw = httpx.post(f"{s.url}/v1/chat/completions", json={**body, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert '"ab"' not in raw and any('"generation_error"' in e for e in events)
    assert events[-1] == "data: [DONE]"
    lines = httpx.post(f"{s.url}/api/chat", json={"model": MODEL, "messages": body["messages"]}).text.splitlines()
    assert "device lost" in lines[-1] and '"error"' in lines[-1]
    gen.fail = False
    ok = httpx.post(f"{s.url}/v1/chat/completions", json=body).json()
    assert ok["choices"][0]["message"]["content"] == "ababa"
    assert ok["usage"]["completion_tokens"] == 5
    assert wait_idle(s.url)["active"] == 0


def test_cancelled_waiting_job_never_runs(base_state):
    from mlxkt.server.engine import Finish, Job, Piece, SamplingParams

    gen = ScriptedGeneration(n=3)
    gen.gate = threading.Event()
    state = scripted_state(base_state, gen)
    engine = state.engine

    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [Job([1, 2, i + 10], SamplingParams(max_tokens=3)) for i in range(3)]
        handles = [engine.submit(j, loop) for j in jobs]
        while not gen.calls:  # the first job is running (held at the gate)
            await asyncio.sleep(0.01)
        assert engine.stats()["waiting"] == 2
        handles[1].cancel()
        gen.gate.set()
        results = []
        for h in handles:
            events = [ev async for ev in h]
            results.append(events)
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        engine.stop()
    assert [r[-1].reason for r in results] == ["length", "cancelled", "length"]
    assert all(isinstance(e, Piece) for r in results for e in r[:-1])
    assert [c[-1] for c in gen.calls] == [10, 12]  # job 2 was never generated
    assert isinstance(results[0][-1], Finish) and results[0][-1].completion_tokens == 3


def test_stop_cancels_running_and_waiting(base_state):
    from mlxkt.server.engine import Job, SamplingParams

    gen = ScriptedGeneration(n=3)
    gen.gate = threading.Event()
    state = scripted_state(base_state, gen)
    engine = state.engine

    async def scenario():
        loop = asyncio.get_running_loop()
        handles = [engine.submit(Job([1, i + 2], SamplingParams(max_tokens=3)), loop) for i in range(3)]
        while not gen.calls:
            await asyncio.sleep(0.01)
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        gen.gate.set()
        out = [[ev async for ev in h][-1].reason for h in handles]
        stopper.join(30)
        return out

    reasons = asyncio.run(scenario())
    assert reasons[1:] == ["cancelled", "cancelled"]
    assert reasons[0] in ("cancelled", "length")
    assert engine.stats()["active"] == 0
    with pytest.raises(RuntimeError):
        engine.submit(Job([1, 2], SamplingParams(max_tokens=1)), asyncio.new_event_loop())


def test_top_p_and_top_k_reach_the_sampler(base_state):
    """Sampling at temperature 1 with a nucleus or top-k of one token is greedy decoding."""
    s = serve(base_state)
    try:
        msgs = [{"role": "user", "content": "def load_model(path):"}]
        body = {"model": MODEL, "messages": msgs, "max_tokens": 16}
        greedy = httpx.post(f"{s.url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=60).json()
        for seed in (1, 2):
            nucleus = httpx.post(f"{s.url}/v1/chat/completions", timeout=60,
                                 json={**body, "temperature": 1.0, "top_p": 1e-6, "seed": seed}).json()
            assert nucleus["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
            top1 = httpx.post(f"{s.url}/api/chat", timeout=60, json={
                "model": MODEL, "messages": msgs, "stream": False,
                "options": {"temperature": 1.0, "top_k": 1, "num_predict": 16, "seed": seed}}).json()
            assert top1["message"]["content"] == greedy["choices"][0]["message"]["content"]
    finally:
        s.stop()
