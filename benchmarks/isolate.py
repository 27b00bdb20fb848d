"""Run code snippets each in its own Python process and report ok / the error tail.

Used by the CUDA crash hunts: an illegal memory access poisons the whole CUDA context, so
every case needs a fresh process."""

import json
import subprocess
import sys


def run_isolated(cases: dict, timeout: float, args=()) -> dict:
    """cases: name -> Python source that prints 'ok' when it succeeds. Prints a line per case
    as it finishes, then the JSON of all results."""
    out = {}
    width = max(map(len, cases)) + 2
    for name, code in cases.items():
        try:
            p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                               text=True, timeout=timeout)
            ok = p.returncode == 0 and "ok" in p.stdout
            out[name] = "ok" if ok else f"FAILED rc={p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
        except subprocess.TimeoutExpired:
            out[name] = "timeout"
        print(f"{name:{width}} {out[name]}", flush=True)
    print(json.dumps(out, indent=1))
    return out
