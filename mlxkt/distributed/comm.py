"""The group, its timeouts and its failures: every collective mlxkt issues goes through here.

Failure policy: a rank that loses a peer cannot go on (the ring backend hangs on the next
collective after one has failed), so it prints one clear line and exits with EXIT_PEER_LOST.
A peer that stops answering without closing its sockets is caught by the watchdog process.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx

EXIT_PEER_LOST = 3
DEFAULT_TIMEOUT = 120.0  # one forward step (a prefill chunk of R1 takes seconds, not minutes)
DEFAULT_LOAD_TIMEOUT = 1800.0  # ranks finish reading hundreds of GB at different times
TIMEOUT_ENV = "MLXKT_DIST_TIMEOUT"
LOAD_TIMEOUT_ENV = "MLXKT_DIST_LOAD_TIMEOUT"
BACKEND_ENV = "MLXKT_DIST_BACKEND"


class DistributedError(RuntimeError):
    pass


def env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not a number of seconds")


class Watchdog:
    """Client of watchdog.py: `with wd.guard(seconds, what): ...` bounds a blocking section."""

    def __init__(self, label: str):
        self.label = label
        script = Path(__file__).with_name("watchdog.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(os.getpid())],
                                     stdin=subprocess.PIPE, close_fds=True)

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write((line.replace("\n", " ") + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the watchdog is gone: nothing left to guard with

    @contextlib.contextmanager
    def guard(self, seconds: float, what: str, hint: str = TIMEOUT_ENV):
        msg = (f"mlxkt distributed [{self.label}]: {what} did not finish within {seconds:g} s; "
               f"a peer stopped answering or is unreachable. Stopping this rank "
               f"(raise the limit with {hint}=seconds).")
        self._send(f"arm {seconds} {msg}")
        try:
            yield
        finally:
            self._send("disarm")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(timeout=5)


def launched_distributed() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process as one rank of several."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile is not None:  # mlx.launch -n 1 writes an empty hostfile
        return Path(hostfile).is_file() and Path(hostfile).stat().st_size > 2
    return any(k in os.environ for k in ("MLX_RANK", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES",
                                         "OMPI_COMM_WORLD_SIZE", "MLX_WORLD_SIZE"))


class Comm:
    """The process group plus the policy around it (timeouts, failure exits)."""

    def __init__(self, backend: Optional[str] = None, timeout: Optional[float] = None):
        self.timeout = timeout or env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT)
        self.load_timeout = env_seconds(LOAD_TIMEOUT_ENV, DEFAULT_LOAD_TIMEOUT)
        backend = backend or os.environ.get(BACKEND_ENV) or "any"
        self.backend = backend
        self.watchdog = Watchdog(f"rank {os.environ.get('MLX_RANK', '?')}")
        self.group = None  # one process: collectives are identities
        if launched_distributed():
            what = f"joining the other ranks ({backend} backend)"
            with self.step(what):
                self.group = mx.distributed.init(strict=True, backend=backend)
        self.rank = self.group.rank() if self.group is not None else 0
        self.size = self.group.size() if self.group is not None else 1
        self.watchdog.label = f"rank {self.rank}/{self.size}"

    def fail(self, what: str, err: Exception):
        print(f"mlxkt distributed [{self.watchdog.label}]: {what} failed: {err}. The other "
              f"rank(s) stopped or are unreachable; exiting.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)

    @contextlib.contextmanager
    def step(self, what: str, seconds: Optional[float] = None, hint: str = TIMEOUT_ENV):
        """Bounds a section that communicates: a failure exits, a hang is cut by the watchdog."""
        with self.watchdog.guard(seconds or self.timeout, what, hint):
            try:
                yield
            except RuntimeError as e:
                if self.group is None:
                    raise
                self.fail(what, e)  # the group's state is unknown after any failure

    def all_sum(self, x: mx.array) -> mx.array:
        if self.group is None:
            return x
        return mx.distributed.all_sum(x, group=self.group)

    def send(self, x: mx.array, dst: int) -> mx.array:
        return mx.distributed.send(x, dst, group=self.group)

    def recv(self, shape, dtype, src: int) -> mx.array:
        return mx.distributed.recv(shape, dtype, src, group=self.group)

    def barrier(self, what: str, seconds: Optional[float] = None, hint: str = TIMEOUT_ENV) -> None:
        with self.step(what, seconds, hint):
            mx.eval(self.all_sum(mx.array(1, dtype=mx.int32)))

    def gather_floats(self, value: float) -> list:
        """Every rank's value, on every rank (an all_sum of one-hot rows)."""
        row = mx.zeros((self.size,), dtype=mx.float32)
        row[self.rank] = value
        with self.step("exchanging rank facts"):
            return self.all_sum(row).tolist()
