"""setup(): what generate / chat / serve call instead of mlxkt.load when --distributed is set."""

import os
import sys
from typing import Callable, Optional, Tuple

MODES = ("pipeline", "experts")
LAYERS_ENV = "MLXKT_PIPELINE_LAYERS"  # e.g. 30,31: layers per rank instead of the memory split


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched as several ranks).
    Cheap: no MLX import, no connection; `serve` uses it to keep HTTP on rank 0."""
    for key in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").strip().isdigit():
            return int(os.environ[key])
    return 0


def setup(model_path, mode: str, *, layers: Optional[str] = None, timeout: Optional[float] = None,
          backend: Optional[str] = None, dtype=None, counter: Optional[list] = None,
          on_follower_exit: Optional[Callable] = None, batch: bool = False) -> Tuple[object, object]:
    """Join the group, load this rank's part of the model and return (model, tokenizer) on rank 0.

    On every other rank it does not return: the rank follows rank 0's forward calls and exits
    the process (status 0) when rank 0 shuts down, or with a clear error when a peer is lost.
    mode: "pipeline" (layer ranges, send/recv) or "experts" (routed experts split by id,
    one all_sum per MoE layer). layers: "30,31" forces the layers per rank in pipeline mode
    (default: MLXKT_PIPELINE_LAYERS, else split by each rank's memory).
    timeout: seconds a step may take (default MLXKT_DIST_TIMEOUT or 120).
    counter / on_follower_exit: benchmark hooks (expert pairs per call; a follower's model
    and its follow() statistics, handed over before the process exits).
    batch: rank 0 never idles (benchmarks, one-shot runs), so a follower that hears nothing
    from it for a step's time limit stops (servers and chats wait forever; runtime.follow).
    """
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {', '.join(MODES)}, not {mode!r}")
    layers = layers or os.environ.get(LAYERS_ENV)
    if mode == "pipeline" and (backend or os.environ.get("MLXKT_DIST_BACKEND")) == "nccl":
        raise ValueError("pipeline mode passes the hidden state with send/recv, which MLX's NCCL "
                         "backend does not have; use --distributed experts on NVIDIA GPUs")
    from .comm import LOAD_TIMEOUT_ENV, Comm
    from .load import load_rank
    from .runtime import DistributedModel, follow

    comm = Comm(backend, timeout)
    if comm.rank != 0:
        try:
            model, _ = load_rank(model_path, mode, comm, layers, dtype, counter)
        except Exception as e:  # rank 0 sees this rank's sockets close and says so too
            print(f"mlxkt distributed [rank {comm.rank}/{comm.size}]: loading failed: {e}",
                  file=sys.stderr, flush=True)
            os._exit(1)
        comm.barrier("waiting for every rank to load its part", comm.load_timeout, LOAD_TIMEOUT_ENV)
        stats = follow(model, comm, batch)
        if on_follower_exit is not None:
            on_follower_exit(model, stats)
        comm.watchdog.close()
        sys.stdout.flush()
        sys.exit(0)
    model, tokenizer = load_rank(model_path, mode, comm, layers, dtype, counter)
    comm.barrier("waiting for every rank to load its part", comm.load_timeout, LOAD_TIMEOUT_ENV)
    return DistributedModel(model, comm, mode), tokenizer
