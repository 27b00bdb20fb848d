"""mlxkt.distributed in one process: layer splits, range reads, expert shards, caches, launch
arguments, the watchdog. The multi-process tests are in test_distributed_ranks.py."""

import contextlib
import itertools
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxkt.demo import DEMO_CONFIG
from mlxkt.distributed import cli, plan, shard
from mlxkt.distributed.load import read_rows
from mlxkt.distributed.runtime import HEAD, INLINE, STOP, FollowerCaches, follow
from mlxkt.loader_utils import mlx_cuda_one_group_bug
from tiny_models import MIXTRAL_CONFIG, random_model

V2_CONFIG = dict(DEMO_CONFIG, model_type="deepseek_v2", q_lora_rank=None, n_shared_experts=2,
                 topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                 n_group=1, topk_group=1, routed_scaling_factor=1.0)
CONFIGS = {"deepseek_v3": DEMO_CONFIG, "deepseek_v2": V2_CONFIG, "mixtral": MIXTRAL_CONFIG}


# --- plan -----------------------------------------------------------------------------------

def brute_force_best(sizes, capacity, extra):
    n, r = len(sizes), len(capacity)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), r - 1):
        bounds = [0, *cuts, n]
        cost = max((sum(sizes[a:b]) + (extra if i == 0 else 0)) / capacity[i]
                   for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))
        best = min(best, cost)
    return best


@pytest.mark.parametrize("ranks", [2, 3])
def test_split_layers_is_optimal_and_contiguous(ranks):
    rng = np.random.default_rng(ranks)
    for _ in range(20):
        sizes = [int(s) for s in rng.integers(1, 100, rng.integers(ranks, 12))]
        capacity = [float(c) for c in rng.uniform(0.5, 2.0, ranks)]
        extra = int(rng.integers(0, 150))
        ranges = plan.split_layers(sizes, capacity, extra)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(ranks - 1))
        cost = max((sum(sizes[a:b]) + (extra if i == 0 else 0)) / capacity[i] for i, (a, b) in enumerate(ranges))
        assert cost == pytest.approx(brute_force_best(sizes, capacity, extra))


def test_split_layers_counts_and_errors():
    assert plan.split_layers([1] * 5, [1, 1], counts=[2, 3]) == [(0, 2), (2, 5)]
    with pytest.raises(ValueError):
        plan.split_layers([1] * 5, [1, 1], counts=[2, 2])
    with pytest.raises(ValueError):
        plan.split_layers([1], [1, 1])
    assert plan.parse_counts("30,31") == [30, 31] and plan.parse_counts("") is None


def test_expert_ranges_cover_every_expert_once():
    for E, size in ((16, 2), (256, 2), (10, 3), (8, 8)):
        ranges = [plan.expert_range(E, r, size) for r in range(size)]
        assert sorted(e for lo, hi in ranges for e in range(lo, hi)) == list(range(E))


def test_range_reads_match_slices(tmp_path):
    t = {"model.layers.0.mlp.switch_mlp.up_proj.weight": mx.random.normal((6, 4, 8)).astype(mx.bfloat16),
         "model.layers.0.mlp.switch_mlp.up_proj.scales": mx.random.normal((6, 4, 2)),
         "model.layers.1.x.weight": mx.random.randint(0, 2**31, (6, 3)).astype(mx.uint32),
         "model.norm.weight": mx.ones((8,))}
    mx.save_safetensors(str(tmp_path / "model-00001-of-00002.safetensors"), dict(list(t.items())[:2]))
    mx.save_safetensors(str(tmp_path / "model-00002-of-00002.safetensors"), dict(list(t.items())[2:]))
    index = plan.weight_index(tmp_path)
    for name, full in t.items():
        got = read_rows(index[name], 2, 5)
        assert got.dtype == full.dtype and mx.array_equal(got, full[2:5]).item()
    sizes, other = plan.layer_bytes(index, 2)
    assert sizes == [t["model.layers.0.mlp.switch_mlp.up_proj.weight"].nbytes
                     + t["model.layers.0.mlp.switch_mlp.up_proj.scales"].nbytes,
                     t["model.layers.1.x.weight"].nbytes]
    assert other == t["model.norm.weight"].nbytes


# --- expert shards --------------------------------------------------------------------------

class FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def all_sum(self, x):
        return x


def tiny(family, quantized):
    model = random_model(CONFIGS[family], seed=3)
    if quantized:
        nn.quantize(model, group_size=64, bits=4,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    mx.eval(model.parameters())
    return model


def shard_copy(family, quantized, rank, size, strategy):
    model = tiny(family, quantized)
    E = model.args.n_routed_experts or model.args.num_local_experts
    lo, hi = plan.expert_range(E, rank, size)
    for _, _, block in shard.moe_blocks(model):
        shard.keep_experts(block.switch_mlp, lo, hi)
        shard.split_shared_experts(block, rank, size)
    shard.wrap_experts(model, FakeComm(rank, size), lo, hi, strategy)
    return model


@pytest.mark.parametrize("family,quantized,size", [
    ("deepseek_v3", True, 2), ("deepseek_v3", False, 2), ("deepseek_v2", False, 2),
    ("mixtral", True, 2), ("deepseek_v3", True, 3)])  # 3 ranks: shared experts stay on rank 0
@pytest.mark.parametrize("strategy", ["compact", "masked"])
def test_expert_shards_add_up_to_the_whole_block(family, quantized, strategy, size):
    full = tiny(family, quantized)
    parts = [shard_copy(family, quantized, r, size, strategy) for r in range(size)]
    for L in (1, 7):
        x = mx.random.normal((1, L, full.args.hidden_size), key=mx.random.key(L))
        for i, attr, block in shard.moe_blocks(full):
            want = block(x)
            got = sum(p.model.layers[i][attr].partial(x) for p in parts)
            assert mx.abs(got - want).max().item() < 1e-4 * (1 + mx.abs(want).max().item())


@pytest.mark.parametrize("family,quantized", [("deepseek_v3", True), ("deepseek_v3", False),
                                              ("deepseek_v2", False)])
@pytest.mark.parametrize("size", [2, 4])
def test_attention_head_shards_add_up_to_the_whole_attention(family, quantized, size):
    full = tiny(family, quantized)
    parts = [tiny(family, quantized) for _ in range(size)]
    for r, p in enumerate(parts):
        attn = p.model.layers[0].self_attn
        assert shard.can_split_attention(attn, size)
        shard.split_attention(attn, FakeComm(r, size))
        assert attn.num_heads == full.model.layers[0].self_attn.num_heads // size
    for L in (1, 3, 40):  # absorbed (decode, MTP verify) and expanded (prefill) paths
        x = mx.random.normal((1, L, full.args.hidden_size), key=mx.random.key(L))
        want = full.model.layers[0].self_attn(x, mask=None if L == 1 else _causal(L))
        got = sum(p.model.layers[0].self_attn(x, mask=None if L == 1 else _causal(L)) for p in parts)
        assert got.shape == want.shape
        # MLX's CUDA float32 matmuls round inputs to TF32 (10-bit mantissa): ~1e-3 there.
        tol = 1e-4 if mx.default_device() == mx.cpu else 2e-3
        assert mx.abs(got - want).max().item() < tol * (1 + mx.abs(want).max().item())


def _causal(L):
    return mx.tril(mx.ones((L, L), dtype=mx.bool_))


def test_attention_split_refuses_uneven_heads():
    attn = tiny("deepseek_v3", True).model.layers[0].self_attn
    assert not shard.can_split_attention(attn, 3)  # 4 heads
    assert not shard.can_split_attention(attn, 1)


def test_split_attention_default(monkeypatch):
    monkeypatch.delenv(shard.SPLIT_ATTENTION_ENV, raising=False)
    assert shard.split_attention_default("nccl") and not shard.split_attention_default("ring")
    monkeypatch.setenv(shard.SPLIT_ATTENTION_ENV, "1")
    assert shard.split_attention_default("ring")
    monkeypatch.setenv(shard.SPLIT_ATTENTION_ENV, "0")
    assert not shard.split_attention_default("nccl")


def test_shared_experts_split_or_kept_on_rank_0():
    model = tiny("deepseek_v3", True)
    block = next(shard.moe_blocks(model))[2]
    hidden = block.shared_experts.gate_proj.weight.shape[0]
    if mlx_cuda_one_group_bug():  # 128 hidden units / 2 ranks = one group of 64 each
        assert shard.split_shared_experts(block, 1, 2) == "rank 0"
        return
    assert shard.split_shared_experts(block, 1, 2) == "split"
    assert block.shared_experts.gate_proj.weight.shape[0] == hidden // 2
    odd = next(shard.moe_blocks(tiny("deepseek_v3", True)))[2]
    assert shard.split_shared_experts(odd, 1, 3) == "rank 0" and "shared_experts" not in odd


def test_local_experts_compute_only_local_pairs():
    model = tiny("deepseek_v3", False)
    counter = []
    block = next(shard.moe_blocks(model))[2]
    shard.keep_experts(block.switch_mlp, 0, 8)
    block.switch_mlp = shard.LocalExperts(block.switch_mlp, 0, 8, "compact", counter)
    inds = mx.array([[[0, 9, 3, 15]]])
    block.switch_mlp(mx.ones((1, 1, model.args.hidden_size)), inds, mx.ones((1, 1, 4)))
    assert counter == [(1, 2)]


# --- follower caches ------------------------------------------------------------------------

def test_follower_caches_trim_and_refuse_desync():
    model = tiny("mixtral", False)
    caches = FollowerCaches(model)
    assert caches.get(0, 0) is None
    c = caches.get(1, 0)
    model.model(mx.array([[5, 6, 7, 8]]), c)
    assert c[0].offset == 4
    assert caches.get(1, 2) is c and c[0].offset == 2
    with pytest.raises(RuntimeError):
        caches.get(1, 3)  # rank 0 says 3 tokens, this rank holds 2
    with pytest.raises(RuntimeError):
        caches.get(2, 5)  # an id never seen, already 5 tokens long on rank 0
    caches.drop([1])
    assert caches.get(1, 0) is not c


class StoppingComm:
    """Rank 1 of 2 whose first message from rank 0 is STOP; records the guarded sections."""
    rank, size, group = 1, 2, None

    def __init__(self):
        self.steps = []

    def all_sum(self, x):
        return mx.array([STOP] + [0] * (HEAD + INLINE - 1), mx.int32)

    @contextlib.contextmanager
    def step(self, what, seconds=None, hint=None):
        self.steps.append(what)
        yield


@pytest.mark.parametrize("batch", [False, True])
def test_follower_bounds_its_wait_for_rank_0_in_batch_runs_only(batch):
    """A server's follower may wait for rank 0 forever; a batch run's waits under the watchdog
    (a rank 0 that vanished without MLX noticing once left a follower waiting in CI)."""
    comm = StoppingComm()
    follow(tiny("mixtral", False), comm, batch=batch)
    assert comm.steps == (["waiting for rank 0's next step"] if batch else [])


# --- launch ---------------------------------------------------------------------------------

def test_launch_plans_local_and_remote():
    assert cli.local_count(2, None, None, "ring") == 2
    assert cli.local_count(2, "10.0.0.1,10.0.0.2", None, "ring") == 0
    argv, env, port = cli.local_ranks(["generate", "--model", "m", "--prompt", "hi"], ranks=2, timeout=30)
    assert argv == [sys.executable, "-m", "mlxkt.cli", "generate", "--model", "m", "--prompt", "hi",
                    "--distributed", "experts"]
    assert env == {"MLXKT_DIST_BACKEND": "ring", "MLXKT_DIST_TIMEOUT": "30"} and port > 0
    assert cli.local_ranks(["python", "x.py"], ranks=2)[0] == ["python", "x.py"]
    args = cli.launch_args(["serve", "m", "--distributed", "pipeline"], hosts="10.0.0.1,10.0.0.2",
                           env=["MLXKT_PIPELINE_LAYERS=30,31"])
    assert args[args.index("--hosts") + 1] == "10.0.0.1,10.0.0.2"
    assert args[args.index("--starting-port") + 1] == "32323"
    assert "MLXKT_PIPELINE_LAYERS=30,31" in args and args[args.index("--python") + 1] == sys.executable
    assert args[args.index("--") + 1:] == ["-m", "mlxkt.cli", "serve", "m", "--distributed", "pipeline"]
    for bad in (dict(hosts="mac1.local,mac2.local"), dict(hosts="10.0.0.1", backend="jaccl"),
                dict(hosts="10.0.0.1", mode="tensor"), dict(hosts="10.0.0.1", backend="gloo"),
                dict(hosts="10.0.0.1", env=["NOEQUALS"])):
        with pytest.raises(ValueError):
            cli.launch_args(["chat", "--model", "m"], **bad)


def test_local_launcher_stops_the_others_when_a_rank_fails():
    from mlxkt.distributed import launch

    code = "import os, sys, time; r = os.environ['MLX_RANK']; sys.exit(7) if r == '1' else time.sleep(60)"
    t0 = time.monotonic()
    assert launch.run_local(2, [sys.executable, "-c", code], {}, launch.free_port_run(2)) == 7
    assert time.monotonic() - t0 < 30


# --- watchdog -------------------------------------------------------------------------------

def start_watchdog(pid):
    script = shard.__file__.replace("shard.py", "watchdog.py")
    return subprocess.Popen([sys.executable, script, str(pid)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_watchdog_stops_a_stuck_process_and_leaves_a_disarmed_one():
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    w1, w2 = start_watchdog(stuck.pid), start_watchdog(fine.pid)
    try:
        w1.stdin.write("arm 0.5 rank 9: step X did not finish\n")
        w1.stdin.flush()
        w2.stdin.write("arm 0.5 should not fire\ndisarm\n")
        w2.stdin.flush()
        assert stuck.wait(timeout=20) != 0
        assert "rank 9: step X did not finish" in w1.communicate(timeout=10)[1]
        time.sleep(1.0)
        assert fine.poll() is None
        w2.stdin.close()  # the parent closing its end: the watchdog exits quietly
        assert w2.wait(timeout=10) == 0 and fine.poll() is None
    finally:
        for p in (stuck, fine, w1, w2):
            if p.poll() is None:
                p.kill()
                p.wait()
