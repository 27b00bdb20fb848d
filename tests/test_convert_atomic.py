"""Atomic output, --force, --resume after Ctrl-C / kill, disk preflight, hub errors, progress."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_convert_synth import REPO, build

import mlxkt.convert.core as core
from mlxkt.convert import ConvertError, convert
from mlxkt.convert.quantize import Transformer

SMALL = 60_000  # max shard bytes: several shards from the synthetic model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build(tmp_path_factory.mktemp("atomic") / "src", "dsv3", fp8=True)


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    return files(convert(src, tmp_path_factory.mktemp("ref") / "out", max_shard_bytes=SMALL, progress=False))


def interrupt_after(monkeypatch, n_calls):
    calls = {"n": 0}
    real = Transformer.run

    def run(self, *args):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(Transformer, "run", run)
    return calls


def count_runs(monkeypatch):
    calls = {"n": 0}
    real = Transformer.run

    def run(self, *args):
        calls["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(Transformer, "run", run)
    return calls


def test_refuses_existing_destination_unless_force(src, tmp_path, reference):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="--force") as e:
        convert(src, dst, progress=False)
    assert e.value.exit_code == 2 and (dst / "old.txt").exists()
    convert(src, dst, force=True, max_shard_bytes=SMALL, progress=False)
    assert not (dst / "old.txt").exists()
    assert files(dst) == reference
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_ctrl_c_then_resume(src, tmp_path, monkeypatch, reference):
    dst = tmp_path / "out"
    interrupt_after(monkeypatch, 40)
    with pytest.raises(ConvertError, match="--resume") as e:
        convert(src, dst, max_shard_bytes=SMALL, progress=False)
    assert e.value.exit_code == 130
    assert not dst.exists()
    partial = core.partial_dir(dst)
    state = json.loads((partial / core.STATE_FILE).read_text())
    assert state["done"], "some shards finished before the interrupt"
    monkeypatch.undo()
    calls = count_runs(monkeypatch)
    convert(src, dst, resume=True, max_shard_bytes=SMALL, progress=False)
    resumed = calls["n"]
    monkeypatch.undo()
    total = count_runs(monkeypatch)
    convert(src, tmp_path / "fresh", max_shard_bytes=SMALL, progress=False)
    assert 0 < resumed < total["n"], "finished shards were re-used"
    assert files(dst) == reference
    assert not partial.exists()


def test_resume_redoes_a_shard_that_does_not_verify(src, tmp_path, monkeypatch, reference):
    dst = tmp_path / "out"
    interrupt_after(monkeypatch, 40)
    with pytest.raises(ConvertError):
        convert(src, dst, max_shard_bytes=SMALL, progress=False)
    partial = core.partial_dir(dst)
    done = json.loads((partial / core.STATE_FILE).read_text())["done"]
    bad = partial / sorted(done)[0]
    raw = bytearray(bad.read_bytes())
    raw[-5] ^= 0xFF
    bad.write_bytes(bytes(raw))
    monkeypatch.undo()
    convert(src, dst, resume=True, max_shard_bytes=SMALL, progress=False)
    assert files(dst) == reference


def test_resume_with_other_options_is_refused(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    interrupt_after(monkeypatch, 40)
    with pytest.raises(ConvertError):
        convert(src, dst, max_shard_bytes=SMALL, progress=False)
    monkeypatch.undo()
    with pytest.raises(ConvertError, match="other options"):
        convert(src, dst, bits=8, resume=True, max_shard_bytes=SMALL, progress=False)
    # Without --resume the leftovers are cleared and the conversion starts over.
    convert(src, dst, bits=8, max_shard_bytes=SMALL, progress=False)
    assert not core.partial_dir(dst).exists()


def test_foreign_partial_directory_is_not_deleted(src, tmp_path):
    dst = tmp_path / "out"
    foreign = core.partial_dir(dst)
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(ConvertError, match="not an mlxkt partial"):
        convert(src, dst, progress=False)
    assert (foreign / "precious.txt").exists()


def test_disk_space_preflight(src, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(core.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ConvertError, match="disk space"):
        convert(src, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar(src, tmp_path, capsys):
    convert(src, tmp_path / "out", progress=True)
    captured = capsys.readouterr()
    assert "convert" in captured.err and "B/s" in captured.err and "tensors" in captured.err
    assert "bits per weight" in captured.out


SLOW_CHILD = """
import sys, time, mlxkt
try:
    import mlxkt.convert
except ImportError:
    mlxkt.__path__.append(sys.argv[3])
from mlxkt.convert.quantize import Transformer
from mlxkt.convert.cli import convert_command
real = Transformer.run
def slow(self, *a, **k):
    time.sleep(0.05)
    return real(self, *a, **k)
Transformer.run = slow
import typer
app = typer.Typer()
app.command()(convert_command)
app([sys.argv[1], sys.argv[2]])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_leaves_no_destination_and_resumes(src, tmp_path, sig, reference):
    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(src), str(dst), str(REPO)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    state = core.partial_dir(dst) / core.STATE_FILE
    deadline = time.time() + 60
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["done"]):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not dst.exists()
    if sig == signal.SIGTERM:
        lines = err.decode().strip().splitlines()
        assert "interrupted" in lines[-1] and "Traceback" not in err.decode()
    convert(src, dst, resume=True, progress=False)
    out = files(dst)
    ref = files(convert(src, tmp_path / "fresh", progress=False))
    assert out == ref


def test_hub_offline_is_one_line(tmp_path):
    child = (
        "import sys, mlxkt\n"
        "try:\n    import mlxkt.convert\nexcept ImportError:\n    mlxkt.__path__.append(sys.argv[2])\n"
        "import typer\nfrom mlxkt.convert.cli import convert_command\n"
        "app = typer.Typer()\napp.command()(convert_command)\n"
        "app(['no-such-org/no-such-model', sys.argv[1]])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", child, str(tmp_path / "out"), str(REPO)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-org/no-such-model" in lines[0] and "Hugging Face" in lines[0]
    assert not (tmp_path / "out").exists()


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(ConvertError, match="no such directory") as e:
        convert(tmp_path / "missing" / "dir", tmp_path / "out", progress=False)
    assert e.value.exit_code == 2
