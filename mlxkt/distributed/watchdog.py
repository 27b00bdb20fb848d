"""A watchdog process that stops its parent when a distributed step takes too long.

MLX's ring backend raises when a peer's socket closes, but a peer that stops answering (a
frozen Mac, a pulled cable) or one that never connects leaves the others waiting forever,
sometimes inside calls that hold the GIL (mx.distributed.init). A thread could not act then;
this separate process can. The parent writes lines to its stdin:

    arm <seconds> <message>    start (or restart) the countdown
    disarm                     stop it
    (end of file)              the parent is gone: exit

When a countdown runs out it prints the message to stderr and terminates the parent
(SIGTERM, then SIGKILL). Run as a script: python watchdog.py <parent pid>. Standard library
only, so it starts in a few milliseconds.
"""

import os
import select
import signal
import sys
import time


def main(parent: int) -> None:
    deadline, message, pending = None, "", b""
    fd = sys.stdin.fileno()
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            stop_parent(parent, message)
            return
        data = os.read(fd, 4096)
        if not data:
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            cmd, _, rest = line.decode(errors="replace").partition(" ")
            if cmd == "arm":
                seconds, _, message = rest.partition(" ")
                deadline = time.monotonic() + float(seconds)
            elif cmd == "disarm":
                deadline = None


def stop_parent(parent: int, message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    try:
        os.kill(parent, signal.SIGTERM)
        for _ in range(30):
            time.sleep(0.1)
            os.kill(parent, 0)  # raises once the parent is gone
        os.kill(parent, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
