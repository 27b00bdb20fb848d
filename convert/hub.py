"""Source resolution: a local directory, or a Hugging Face repo id fetched with huggingface-hub."""

import re
from pathlib import Path
from typing import Optional, Tuple

from .errors import ConvertError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Only what the conversion reads: never pickles (*.bin, *.pt) or remote code (*.py).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.tiktoken", "*.model", "*.txt"]


def resolve_source(src: str, revision: Optional[str] = None) -> Tuple[Path, str]:
    """-> (local directory, label for the metadata)."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConvertError(f"{p}: not a directory", 2)
        if revision:
            raise ConvertError(f"{p}: --revision applies only to Hugging Face repo ids", 2)
        p = p.resolve()
        return p, str(p)
    if not REPO_ID.fullmatch(src) or src.startswith((".", "/", "~")):
        raise ConvertError(f"{src}: no such directory, and not a Hugging Face repo id", 2)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(src, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # offline, unknown repo, revision not found, HTTP errors...
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConvertError(
            f"{src}: cannot fetch it from the Hugging Face Hub (offline, or no such repo/revision?): "
            f"{type(e).__name__}: {msg}"
        ) from None
    return Path(path), f"{src}@{revision or 'main'}"
