"""convert(): validate, plan, stream every tensor into shards in a temporary sibling
directory, then rename it into place. Interrupted runs keep the temporary directory so
`resume=True` can re-use the shards that verify."""

import json
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .errors import ConvertError
from .hub import resolve_source
from .output import SHARD_METADATA, write_json, write_outputs
from .plan import OUT_DTYPES, Options, Plan, build_plan
from .recipes import check_recipe
from .source import Reader, load_tensors
from .validate import check_files, read_config
from .writer import ShardWriter, verify

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
STATE_FILE = ".mlxkt-convert.json"
DISK_MARGIN = 64 * 2**20


def partial_dir(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.mlxkt-partial"


def check_options(bits, group_size, dtype, recipe) -> str:
    if bits not in BITS:
        raise ConvertError(f"--bits {bits}: must be one of {', '.join(map(str, BITS))}", 2)
    if group_size not in GROUP_SIZES:
        raise ConvertError(f"--group-size {group_size}: must be one of {', '.join(map(str, GROUP_SIZES))}", 2)
    if dtype not in OUT_DTYPES:
        raise ConvertError(f"--dtype {dtype}: must be one of {', '.join(OUT_DTYPES)}", 2)
    return check_recipe(recipe)


def convert(src, dst, *, bits: int = 4, group_size: int = 64, quantize: bool = True,
            dtype: str = "bfloat16", recipe: Optional[str] = None, force: bool = False,
            resume: bool = False, revision: Optional[str] = None, progress: bool = True,
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Convert a Hugging Face checkpoint (directory or repo id) into an MLX directory `dst`."""
    recipe = check_options(bits, group_size, dtype, recipe)
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to replace it", 2)
    src_dir, label = resolve_source(str(src), revision)
    if dst == src_dir or src_dir in dst.parents:
        raise ConvertError(f"{dst}: the destination must not be the source or inside it", 2)

    check_files(src_dir)
    config = read_config(src_dir)
    tensors = load_tensors(src_dir)
    opts = Options(bits, group_size, quantize, dtype, recipe, max_shard_bytes)
    plan = build_plan(tensors, config, opts)

    tmp = partial_dir(dst)
    state = prepare_partial(tmp, plan, resume)
    preflight(tmp, plan, state)
    t0 = time.time()
    with _sigterm_as_interrupt():
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            save_state(tmp, state)
            write_shards(tmp, plan, state, config, progress)
            write_outputs(tmp, src_dir, config, plan, label)
            install(tmp, dst)
            (dst / STATE_FILE).unlink()
        except KeyboardInterrupt:
            raise ConvertError(
                f"{dst}: interrupted; nothing written there (partial output kept in {tmp}; "
                "rerun with --resume to continue)", 130) from None
        except ConvertError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as e:
            raise ConvertError(f"{e.filename or tmp}: {e.strerror or e} (partial output kept in {tmp})") from None
    if progress:
        print(summary(dst, plan, time.time() - t0, tensors))
    return dst


def prepare_partial(tmp: Path, plan: Plan, resume: bool) -> dict:
    """State of a previous run to resume from, or a fresh one (clearing our own leftovers)."""
    fresh = {"fingerprint": plan.fingerprint, "done": {}}
    if not tmp.exists():
        return fresh
    try:
        old = json.loads((tmp / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise ConvertError(f"{tmp}: exists and is not an mlxkt partial conversion; remove it", 2) from None
    if not resume:
        shutil.rmtree(tmp)  # a previous interrupted run of ours; start over
        return fresh
    if old.get("fingerprint") != plan.fingerprint:
        raise ConvertError(
            f"{tmp}: the interrupted run used another source or other options; rerun without --resume", 2)
    return {"fingerprint": plan.fingerprint, "done": old.get("done", {})}


def preflight(tmp: Path, plan: Plan, state: dict) -> None:
    done = sum(r.get("size", 0) for r in state["done"].values())
    need = plan.total_bytes - done + DISK_MARGIN
    probe = tmp if tmp.exists() else tmp.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ConvertError(
            f"{tmp.parent}: not enough disk space: the output needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free", 1)


def save_state(tmp: Path, state: dict) -> None:
    write_json(tmp / STATE_FILE, state)


def write_shards(tmp: Path, plan: Plan, state: dict, config: dict, progress: bool) -> None:
    import mlx.core as mx
    from tqdm import tqdm

    from .quantize import Transformer

    qc = config.get("quantization_config") or {}
    reader = Reader()
    tf = Transformer(reader, qc.get("weight_block_size") or (128, 128))
    jobs = [j for s in plan.shards for u in s.units for j in u.jobs]
    bar = tqdm(total=sum(j.src.nbytes for j in jobs), unit="B", unit_scale=True,
               unit_divisor=1024, desc="convert", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    n_done, n_jobs = 0, len(jobs)

    def count_job():
        nonlocal n_done
        n_done += 1
        bar.set_postfix_str(f"tensors {n_done}/{n_jobs}", refresh=False)

    old_limit = mx.set_cache_limit(256 * 2**20)  # bound MLX's buffer cache
    try:
        for shard in plan.shards:
            shard_jobs = [j for u in shard.units for j in u.jobs]
            path, record = tmp / shard.filename, state["done"].get(shard.filename)
            if record and verify(path, shard.tensors, SHARD_METADATA, record):
                n_done += len(shard_jobs)
                bar.update(sum(j.src.nbytes for j in shard_jobs))
                continue
            state["done"].pop(shard.filename, None)
            writer = ShardWriter(path, shard.tensors, SHARD_METADATA)
            try:
                tf.run_all(shard_jobs, writer.write, bar.update, on_job=count_job)
                state["done"][shard.filename] = writer.finish()
            finally:
                writer.abort()
            save_state(tmp, state)
    finally:
        mx.set_cache_limit(old_limit)
        mx.clear_cache()
        reader.close()
        bar.close()


def install(tmp: Path, dst: Path) -> None:
    """Rename the finished directory into place; an old destination (--force) goes last."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.mlxkt-old"
        if old.exists():
            shutil.rmtree(old)
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def summary(dst: Path, plan: Plan, seconds: float, tensors) -> str:
    n = len(plan.main_shards)
    mtp = " + mtp.safetensors" if len(plan.shards) > n else ""
    src_gb = sum(t.nbytes for t in tensors.values()) / 1e9
    return (
        f"Converted to {dst}: {plan.total_bytes / 1e9:.2f} GB in {n} shard(s){mtp}, "
        f"{plan.bits_per_weight:.3f} bits per weight, {seconds:.1f} s "
        f"({src_gb * 1e3 / max(seconds, 1e-9):.1f} MB/s of source)"
    )


@contextmanager
def _sigterm_as_interrupt():
    """A plain `kill` takes the Ctrl-C path (partial directory kept, destination untouched)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
