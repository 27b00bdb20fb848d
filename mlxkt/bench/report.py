"""The bench's table (text) and plot (PNG) from its JSON."""

import json
from pathlib import Path


def table(result: dict) -> str:
    res = result["engines"]
    names = list(res)
    lines = [f"machine: {result['machine'].get('gpu') or result['machine'].get('cpu')} "
             f"({result['machine']['device']}), mlx {result['machine']['mlx']}, "
             f"mlx-lm {result['machine'].get('mlx_lm')}, commit {result.get('commit')}",
             f"copy bandwidth: {result['copy_gbps']:.1f} GB/s"]
    w = max(16, *(len(n) + 2 for n in names))
    head = f"{'':28}" + "".join(f"{n:>{w}}" for n in names)
    lines += ["", head, "-" * len(head)]

    def row(label, cells):
        lines.append(f"{label:28}" + "".join(f"{c:>{w}}" for c in cells))

    row("weights GB", [f"{res[n]['weights_gb']:.2f}" for n in names])
    row("active GB / token", [f"{res[n]['active_gb_per_token']:.3f}" for n in names])
    row("warm-up s (compile)", [f"{res[n].get('warmup_s', float('nan')):.1f}" for n in names])
    for k in _keys(res, "prefill"):
        row(f"prefill {k} tok/s", [_fmt(res[n]["prefill"].get(k), "tok_s", "{:.1f}") for n in names])
    for k in _keys(res, "prefill_first_new"):  # n + a few tokens, one-time kernel builds included
        row(f"prefill {k}+ 1st new len tok/s", [_fmt(res[n].get("prefill_first_new", {}).get(k), "tok_s", "{:.1f}") for n in names])
    for k in _keys(res, "prefill_new"):  # n + a few more tokens, another length not run before
        row(f"prefill {k}+ new len tok/s", [_fmt(res[n].get("prefill_new", {}).get(k), "tok_s", "{:.1f}") for n in names])
    for k in _keys(res, "decode"):
        row(f"decode @{k} tok/s", [_fmt(res[n]["decode"].get(k), "tok_s", "{:.2f}") for n in names])
        row(f"decode @{k} ms/token", [_fmt(res[n]["decode"].get(k), "ms_per_token", "{:.2f}") for n in names])
        row(f"decode @{k} % copy BW", [_fmt(res[n]["decode"].get(k), "of_copy_bw", "{:.0%}") for n in names])
        row(f"decode @{k} peak+ GB", [_fmt(res[n]["decode"].get(k), "transient_peak_gb", "{:.2f}") for n in names])
    row("graph nodes / token", [str(res[n].get("graph", {}).get("non_view_nodes", "-")) for n in names])
    # Views too: MLX's host builds and walks them like any node (~3 µs each on an H200).
    row("graph nodes incl. views", [str(res[n].get("graph", {}).get("nodes", "-")) for n in names])
    row("graph build ms / token", [_fmt(res[n].get("graph"), "build_ms", "{:.2f}") for n in names])
    for n in names:
        if "failed" in res[n]:
            lines += ["", f"{n}: FAILED in warm-up, left out: {res[n]['failed']}"]
    for name, rs in result.get("ratios", {}).items():
        lines += ["", f"{name} (same run):"]
        lines += [f"  {k:26} {v:6.2f}x" for k, v in rs.items()]
    for n in names:
        for b in res[n].get("breakdown", []):
            what = (f"one decode step @{b['context']}" if b.get("tokens", 1) == 1
                    else f"a {b['tokens']}-token prefill chunk ending @{b['context']}")
            eager = ", compiled layers timed eagerly" if b.get("eager_modules") else ""
            lines += ["", f"{n}: {what} ({b['forward_ms']:.2f} ms isolated, "
                      f"sync {b['sync_ms']:.3f} ms subtracted{eager}), per component summed over layers:"]
            lines += [f"  {r['component']:40} {r['ms']:8.3f} ms {r['share']:6.1%}" for r in b["rows"]]
    return "\n".join(lines)


def _keys(res: dict, kind: str) -> list:
    """Measurement keys of every engine, in first-seen order (a failed engine has none)."""
    return list(dict.fromkeys(k for r in res.values() for k in r.get(kind, {})))


def _fmt(d, key, f):
    if not d or key not in d:
        return (d or {}).get("skipped", "-")[:15] if d else "-"
    return f.format(d[key])


def plot(result: dict, path: Path) -> bool:
    """Decode tok/s against context and prefill tok/s against prompt length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["engines"].items():
        for ax, kind in zip(axes, ("decode", "prefill")):
            pts = sorted((int(k), v["tok_s"]) for k, v in r[kind].items() if "tok_s" in v)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
    m = result["machine"]
    title = f"{m.get('gpu') or m.get('cpu')} | {Path(result['model_path']).name}"
    for ax, kind, xl in zip(axes, ("decode", "prefill"), ("context (tokens)", "prompt (tokens)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel(f"{kind} tok/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replot(json_path, png_path) -> bool:
    return plot(json.loads(Path(json_path).read_text()), Path(png_path))
