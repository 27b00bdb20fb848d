"""How long one small all-reduce takes on this machine's GPUs, outside MLX: PyTorch's NCCL
all_reduce of one decode token's hidden state (7168 bf16 values, 14 KB), for comparison with
the MLX all_sum times that benchmarks/distributed.py reports. Needs torch with CUDA and 2+ GPUs
(the device machines have it; mlxkt itself does not use torch).

    python3 benchmarks/allreduce.py [--sizes 7168,57344] [--iters 500] [--json F]

Two timings per size, median over --iters after a warm-up:
  synced:    all_reduce, then torch.cuda.synchronize(), each call (what a decode step that
             reads the result back sees);
  streamed:  --iters all_reduces queued back to back, total / iters (the link's and NCCL's own
             cost, host waits hidden).
"""

import argparse
import json
import os
import statistics
import time


def worker(rank: int, world: int, sizes: list, iters: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    rows = []
    for n in sizes:
        x = torch.zeros(n, dtype=torch.bfloat16, device="cuda")  # stays finite when summed
        for _ in range(50):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        synced = []
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            torch.cuda.synchronize()
            synced.append(time.perf_counter() - t0)
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        streamed = (time.perf_counter() - t0) / iters
        rows.append({"values": n, "bytes": 2 * n, "synced_us": 1e6 * statistics.median(synced),
                     "streamed_us": 1e6 * streamed})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="7168,57344", help="values per all-reduce (bf16)")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < args.ranks:
        raise SystemExit(f"needs {args.ranks} CUDA GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = [ctx.Process(target=worker, args=(r, args.ranks, sizes, args.iters, args.port, queue))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    try:
        rows = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    report = {"bench": "torch-nccl-allreduce", "ranks": args.ranks, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0), "rows": rows}
    print(f"{'values':>8}{'bytes':>8}{'synced µs':>11}{'streamed µs':>13}")
    for r in rows:
        print(f"{r['values']:>8}{r['bytes']:>8}{r['synced_us']:>11.1f}{r['streamed_us']:>13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
