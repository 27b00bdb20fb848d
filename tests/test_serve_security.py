"""Hardening: API key, bind refusal, Host and Origin checks, CORS, body size; and the real
`serve` command in a subprocess (starts, enforces its key, exits cleanly on Ctrl-C)."""

import inspect
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from test_serve_common import MODEL, REPO, base_state, model_dir, serve, with_settings  # noqa: F401

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

KEY = "test-key-123"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "x = 1"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def keyed(base_state):
    s = serve(with_settings(base_state, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain(base_state):
    s = serve(with_settings(base_state, max_body_bytes=2048))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cors(base_state):
    s = serve(with_settings(base_state, allowed_origins=("http://app.example",)))
    yield s
    s.stop()


def test_api_key_required(keyed):
    url = f"{keyed.url}/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(url, json=BODY, headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=BODY, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    r = httpx.post(f"{keyed.url}/api/chat", json={"model": MODEL, "messages": BODY["messages"]})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    # The page and the health probe carry nothing secret.
    assert httpx.get(f"{keyed.url}/").status_code == 200
    assert httpx.get(f"{keyed.url}/health").status_code == 200


def test_api_key_with_real_clients(keyed):
    bad = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(**BODY).usage.completion_tokens == 2
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url).list()
    assert e.value.status_code == 401
    authed = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"})
    assert authed.chat(model=MODEL, messages=BODY["messages"], options={"num_predict": 2}).done


def test_default_bind_is_loopback_and_open_bind_needs_a_key(tmp_path):
    import typer

    from mlxkt.server.cli import serve_command

    assert inspect.signature(serve_command).parameters["host"].default == "127.0.0.1"
    missing = str(tmp_path / "no-model")
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(typer.Exit) as e:
            serve_command(missing, host=host)  # refused before any loading
        assert e.value.exit_code == 2
    # With a key (or --insecure) it goes on, and fails only on the missing model.
    for kw in ({"api_key": "k"}, {"insecure": True}):
        with pytest.raises(Exception, match="no-model"):
            serve_command(missing, host="0.0.0.0", **kw)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", ""])
def test_foreign_host_header_refused(plain, host):
    for path in ("/", "/v1/models", "/api/tags"):
        r = httpx.get(f"{plain.url}{path}", headers={"Host": host})
        assert r.status_code == 403 and "host" in r.text.lower()


def test_loopback_host_names_accepted(plain):
    port = plain.server.port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{plain.url}/v1/models", headers={"Host": host}).status_code == 200


def test_cross_origin_refused_without_allowed_origins(plain):
    evil = {"Origin": "http://evil.example"}
    r = httpx.post(f"{plain.url}/v1/chat/completions", json=BODY, headers=evil)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    pre = httpx.options(f"{plain.url}/v1/chat/completions",
                        headers={**evil, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    same = httpx.post(f"{plain.url}/v1/chat/completions", json=BODY, headers={"Origin": plain.url})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers


def test_cors_with_allowed_origins(cors):
    app = {"Origin": "http://app.example"}
    pre = httpx.options(f"{cors.url}/v1/chat/completions", headers={
        **app, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.post(f"{cors.url}/v1/chat/completions", json=BODY, headers=app)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.post(f"{cors.url}/v1/chat/completions", json=BODY, headers={"Origin": "http://other.example"})
    assert other.status_code == 403


def test_body_size_limit(plain):
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 4000}]}
    r = httpx.post(f"{plain.url}/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(f"{plain.url}/api/chat", json={"model": MODEL, "messages": big["messages"]})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "%s", "messages": [{"role": "user", "content": "' % MODEL.encode()
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = httpx.post(f"{plain.url}/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"{plain.url}/v1/chat/completions", json=BODY).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_in_a_subprocess(model_dir):
    port = _free_port()
    code = "import typer; from mlxkt.server.cli import serve_command; typer.run(serve_command)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLXKT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-c", code, str(model_dir), "--port", str(port),
                             "--model-name", MODEL, "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/chat/completions", json=BODY).status_code == 401  # key from env
        r = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, out
        assert "serving" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
