"""Starting the ranks: our own small launcher for ranks on this machine, mlx.launch (ssh) for
other hosts. Standard library only.

Local ranks do not go through mlx.launch because its output-relaying threads spin (measured:
~75% of a core on this 2-core box, taken from the ranks), it never closes the ranks' stdin
(so `--prompt -` would wait forever) and it exits 0 when a rank fails. Here each rank writes
straight to our stdout/stderr, rank 0 alone reads stdin, and the first failure stops the rest.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

LAUNCHER = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()"
FAILED = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")


def free_port_run(count: int) -> int:
    """A first port such that `count` consecutive ports are free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        if start + count > 65535:
            continue
        try:
            for p in range(start, start + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
    raise RuntimeError("no free ports for the ring backend on 127.0.0.1")


def exit_status(rc: int) -> int:
    return rc if rc >= 0 else 128 - rc  # killed by signal N: the shell's 128 + N


def rank_gpu(rank: int, visible: Optional[str]) -> str:
    """The GPU a local NCCL rank sees: the rank-th of the parent's CUDA_VISIBLE_DEVICES (if set),
    else GPU `rank`, as mlx.launch --backend nccl does."""
    listed = [d.strip() for d in (visible or "").split(",") if d.strip()]
    return listed[rank % len(listed)] if listed else str(rank)


# Defaults for NCCL ranks that the caller's environment may override. MLX's CUDA backend
# captures each NCCL call into the CUDA graph it batches kernels into; with graphs off, experts
# mode on two H200s decoded 1.35x faster (156 -> 211 tok/s), while one GPU alone loses
# 12% (324 -> 284), so only multi-rank NCCL runs get it.
NCCL_DEFAULTS = {"MLX_USE_CUDA_GRAPHS": "0"}


def nccl_env(rank: int, ranks: int, port: int, visible: Optional[str]) -> Dict[str, str]:
    """What MLX's NCCL backend reads (what mlx.launch sets): one GPU per rank, rank 0 hands out
    NCCL's id on 127.0.0.1:port."""
    return {"MLX_RANK": str(rank), "MLX_WORLD_SIZE": str(ranks), "NCCL_HOST_IP": "127.0.0.1",
            "NCCL_PORT": str(port), "CUDA_VISIBLE_DEVICES": rank_gpu(rank, visible)}


def run_local(ranks: int, argv: List[str], env: Dict[str, str], port: int, backend: str = "ring") -> int:
    """Run `argv` as ranks 0..ranks-1 on 127.0.0.1 (ring: `port`.. one per rank; nccl: `port`
    for the id exchange, one GPU per rank); -> the first failure's status."""
    base = {**os.environ, **env}
    hostfile = None
    if ranks > 1 and backend == "ring":
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mlxkt-hosts-", delete=False) as f:
            json.dump([[f"127.0.0.1:{port + r}"] for r in range(ranks)], f)
            hostfile = f.name
    procs = []
    try:
        for r in range(ranks):
            rank_env = dict(base, MLX_RANK=str(r), MLX_HOSTFILE=hostfile) if hostfile else base
            if ranks > 1 and backend == "nccl":
                rank_env = {**NCCL_DEFAULTS, **base,
                            **nccl_env(r, ranks, port, os.environ.get("CUDA_VISIBLE_DEVICES"))}
            procs.append(subprocess.Popen(argv, env=rank_env, stdin=None if r == 0 else subprocess.DEVNULL))
        status = 0
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = exit_status(failed[0].returncode)
                stop(procs)
                break
            time.sleep(0.2)
        for p in procs:
            if status == 0 and p.wait() != 0:
                status = exit_status(p.returncode)
        return status
    except KeyboardInterrupt:
        stop(procs)
        return 130
    finally:
        stop(procs)
        if hostfile:
            os.unlink(hostfile)


def stop(procs, grace: float = 5.0) -> None:
    """SIGTERM the ranks still running, SIGKILL them after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_mlx_launch(args: List[str]) -> int:
    """Run mlx.launch (ssh to each host); its exit status is 0 even when a rank fails, so read
    the report it prints."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], stderr=subprocess.PIPE)
    failed = []

    def relay():
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            m = FAILED.search(line)
            if m:
                failed.append(int(m.group(3)) if m.group(3) else 1)
            sys.stderr.write(line)
            sys.stderr.flush()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    t.join(5)
    if rc == 0 and failed:
        rc = next((exit_status(c) for c in failed if c), 1)
    return rc
