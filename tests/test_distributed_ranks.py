"""Two local ranks over the ring backend (127.0.0.1 only).

- `mlxkt launch -n 2` of pipeline and expert modes gives the greedy tokens of one process for
  a generation, a two-turn chat (cache reuse and trimming) and two server-engine requests,
  on a 4-bit DeepSeek-V3 and a float32 Mixtral (random tiny models saved to disk).
- A killed peer, on either side, makes the other rank exit with a clear error; a peer that
  never comes makes the waiting rank give up after the timeout.
Every process is bounded (RUN_TIMEOUT) and killed with its process group if it overstays.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mlxkt.demo import DEMO_CONFIG
from mlxkt.distributed import launch, run
from tiny_models import MIXTRAL_CONFIG, deepseek_tiny, mixtral_tiny

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 90  # one launch: imports on 2 busy cores dominate (a few s when idle)
STEP_TIMEOUT = "30"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-models")
    return {
        "deepseek_v3": run.write_model_dir(deepseek_tiny(), DEMO_CONFIG, root / "dsv3", quantize=True),
        "mixtral": run.write_model_dir(mixtral_tiny(), dict(MIXTRAL_CONFIG, bos_token_id=0, eos_token_id=1),
                             root / "mixtral", quantize=False),
    }


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
    """One process (mlxkt.load), same driver, computed once per family."""
    done = {}

    def get(family):
        if family not in done:
            out = tmp_path_factory.mktemp("ref") / f"{family}.json"
            run.main([str(tiny_dirs[family]), "--mode", "single", "--out", str(out),
                      "--max-tokens", str(MAX_TOKENS), "--ignore-eos"])
            done[family] = json.loads(out.read_text())
        return done[family]

    return get


def child_env(**extra):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "MLXKT_DIST_TIMEOUT": STEP_TIMEOUT, **extra}


def run_bounded(argv, timeout=RUN_TIMEOUT, **env):
    p = subprocess.Popen(argv, cwd=REPO, env=child_env(**env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{argv} did not finish within {timeout} s")
    return p.returncode, out, err


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
@pytest.mark.parametrize("mode", ["pipeline", "experts"])
def test_two_ranks_give_the_tokens_of_one_process(tiny_dirs, reference, tmp_path, family, mode):
    ref = reference(family)
    out = tmp_path / "r.json"
    rc, _, err = run_bounded([sys.executable, "-m", "mlxkt.distributed.cli", "-n", "2", "--timeout", STEP_TIMEOUT,
                              "--", sys.executable, "-m", "mlxkt.distributed.run", str(tiny_dirs[family]),
                              "--mode", mode, "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--ignore-eos"])
    assert rc == 0, err
    got = json.loads(out.read_text())
    other = json.loads(Path(f"{out}.rank1").read_text())
    assert got["size"] == 2
    assert len(ref["generate"]["tokens"]) == MAX_TOKENS
    assert got["generate"]["tokens"] == ref["generate"]["tokens"]
    np.testing.assert_allclose(got["generate"]["logprobs"], ref["generate"]["logprobs"], atol=1e-4)
    assert got["chat"] == ref["chat"]
    assert got["engine"] == ref["engine"]
    b0, b1, single = got["bytes"], other["bytes"], ref["bytes"]
    if mode == "pipeline":  # every MoE layer on exactly one rank
        assert b0["moe_layers"] + b1["moe_layers"] == single["moe_layers"]
    else:  # every (token, expert) pair computed by exactly one rank
        assert b0["expert_pairs_per_token"] + b1["expert_pairs_per_token"] == pytest.approx(
            single["expert_pairs_per_token"])
    assert b0["bytes_per_token"] < single["bytes_per_token"]
    assert b1["bytes_per_token"] < single["bytes_per_token"]


def test_split_heads_and_steps_built_ahead_give_the_tokens_of_one_process(tiny_dirs, reference, tmp_path):
    """The GPU set-up of experts mode, on the CPU: heads split too (a second all_sum per
    layer), masked expert shards (no host sync), so followers build decode steps ahead."""
    ref = reference("deepseek_v3")
    out = tmp_path / "r.json"
    rc, _, err = run_bounded([sys.executable, "-m", "mlxkt.distributed.cli", "-n", "2", "--timeout", STEP_TIMEOUT,
                              "--", sys.executable, "-m", "mlxkt.distributed.run", str(tiny_dirs["deepseek_v3"]),
                              "--mode", "experts", "--out", str(out), "--max-tokens", str(MAX_TOKENS),
                              "--ignore-eos", "--pairs", "routing"],
                             MLXKT_SPLIT_ATTENTION="1", MLXKT_EXPERT_SHARD="masked")
    assert rc == 0, err
    assert "attention: 2 of 4 heads per rank" in err, err
    got = json.loads(out.read_text())
    follow = json.loads(Path(f"{out}.rank1").read_text())["follow"]
    assert got["generate"]["tokens"] == ref["generate"]["tokens"]
    np.testing.assert_allclose(got["generate"]["logprobs"], ref["generate"]["logprobs"], atol=1e-4)
    assert got["chat"] == ref["chat"]
    assert got["engine"] == ref["engine"]
    # Most decode steps were built ahead; each new request or trimmed cache threw one away.
    assert follow["built_ahead"] >= MAX_TOKENS
    assert follow["ahead_undone"] >= 2


class Ranks:
    """Ranks started by hand (known pids), with their stderr collected as it comes."""

    def __init__(self, tmp_path, argv, ranks=(0, 1), size=2, timeout=STEP_TIMEOUT):
        port = launch.free_port_run(size)
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(size)]))
        self.procs, self.err, self.readers = {}, {}, {}
        for r in ranks:
            env = child_env(MLX_HOSTFILE=str(hostfile), MLX_RANK=str(r), MLXKT_DIST_BACKEND="ring",
                            MLXKT_DIST_TIMEOUT=str(timeout))
            p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
            self.procs[r], self.err[r] = p, []
            t = threading.Thread(target=lambda p=p, e=self.err[r]: e.extend(p.stderr), daemon=True)
            t.start()
            self.readers[r] = t

    def stderr(self, r):
        if self.procs[r].poll() is not None:
            self.readers[r].join(10)  # the watchdog (same stderr) may write after the rank exits
        return "".join(self.err[r])

    def wait_for(self, r, text, timeout=RUN_TIMEOUT):
        end = time.monotonic() + timeout
        while text not in self.stderr(r):
            if time.monotonic() > end or self.procs[r].poll() is not None:
                pytest.fail(f"rank {r} never printed {text!r}: {self.stderr(r)}")
            time.sleep(0.1)

    def cleanup(self):
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_peer_stops_the_other_rank_with_an_error(tiny_dirs, tmp_path, victim):
    ranks = Ranks(tmp_path, [sys.executable, "-m", "mlxkt.distributed.run", str(tiny_dirs["deepseek_v3"]),
                             "--mode", "experts", "--out", str(tmp_path / "x.json"), "--scenarios",
                             "generate", "--max-tokens", "1000000", "--ignore-eos"])
    try:
        for r in (0, 1):
            ranks.wait_for(r, f"[mlxkt] rank {r}/2")
        time.sleep(1.0)  # decoding by now
        survivor = 1 - victim
        assert ranks.procs[survivor].poll() is None
        ranks.procs[victim].kill()
        t0 = time.monotonic()
        rc = ranks.procs[survivor].wait(timeout=float(STEP_TIMEOUT) + 15)
        waited = time.monotonic() - t0
        err = ranks.stderr(survivor)
        assert rc != 0
        assert f"mlxkt distributed [rank {survivor}/2]" in err, err
        if waited >= float(STEP_TIMEOUT):
            # MLX's ring backend raises on the closed socket within seconds (every local run);
            # in 2 of about 10 loaded CI runs rank 0 kept waiting instead. Then the watchdog
            # must be what stopped it, at the step timeout, with its message.
            assert "did not finish within" in err, err
    finally:
        ranks.cleanup()


def test_a_peer_that_never_comes_times_out(tiny_dirs, tmp_path):
    ranks = Ranks(tmp_path, [sys.executable, "-m", "mlxkt.distributed.run", str(tiny_dirs["mixtral"]),
                             "--mode", "pipeline", "--out", str(tmp_path / "x.json")], ranks=(0,), timeout=4)
    try:
        rc = ranks.procs[0].wait(timeout=RUN_TIMEOUT)
        err = ranks.stderr(0)
        assert rc != 0
        assert "joining the other ranks (ring backend) did not finish within 4 s" in err, err
    finally:
        ranks.cleanup()
