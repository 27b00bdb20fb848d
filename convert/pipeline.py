"""Overlap disk I/O with compute: a read-ahead thread and a write-behind thread, each bounded
to a few chunks so memory stays O(chunk). Both keep order, so per-tensor hashes stay valid."""

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def prefetch(items: Iterable, fn: Callable, depth: int = 2) -> Iterator:
    """Yield fn(*item) for each item, computing up to `depth` ahead in one background thread."""
    with ThreadPoolExecutor(1, thread_name_prefix="mlxkt-read") as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, *item))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


class WriteBehind:
    """Calls write(*args) in one background thread, in order; errors re-raised on the caller."""

    def __init__(self, write: Callable, depth: int = 4):
        self._write, self._queue = write, queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._loop, name="mlxkt-write", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e

    def __call__(self, *args):
        if self._error is not None:
            raise self._error
        self._queue.put(args)

    def close(self):
        """Wait for every queued write; re-raise the first error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
