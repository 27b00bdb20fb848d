"""The command line as a user runs it: demo checkpoint -> convert -> info / generate."""

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from mlxkt.cli import app
from mlxkt.demo import write_release_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = write_release_checkpoint(root / "hf")
    r = runner.invoke(app, ["convert", str(src), str(root / "mlx")])
    assert r.exit_code == 0, r.output
    return root


def test_help_is_fast_and_lists_commands():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mlxkt.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert time.perf_counter() - t0 < 10  # generous: only guards against importing MLX eagerly
    for cmd in ("generate", "chat", "convert", "info", "demo"):
        assert cmd in out
    code = "import sys, mlxkt.cli; print('mlx.core' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_generate_streams_text_and_stats(converted):
    r = runner.invoke(app, ["generate", "--model", str(converted / "mlx"), "--prompt", "hello",
                            "--max-tokens", "12", "--no-mtp"])
    assert r.exit_code == 0, r.output
    assert "Prompt:" in r.stderr and "tokens-per-sec" in r.stderr
    assert "Generation: 12 tokens" in r.stderr and "Peak memory:" in r.stderr
    assert r.stdout.strip()


def test_generate_prompt_from_stdin_with_mtp_stats(converted):
    r = runner.invoke(app, ["generate", "-m", str(converted / "mlx"), "-p", "-", "-n", "10",
                            "--temp", "0.8", "--seed", "1", "--mtp"], input="from stdin")
    assert r.exit_code == 0, r.output
    assert "MTP:" in r.stderr and "Generation: 10 tokens" in r.stderr


def test_unconverted_checkpoint_gets_clear_message(converted):
    r = runner.invoke(app, ["generate", "-m", str(converted / "hf"), "-p", "x"])
    assert r.exit_code == 1
    assert "mlxkt convert" in r.stderr and "Traceback" not in r.output


def test_missing_model_dir(tmp_path):
    r = runner.invoke(app, ["generate", "-m", str(tmp_path / "nope"), "-p", "x"])
    assert r.exit_code == 1 and "no such model directory" in r.stderr


def test_info(converted):
    r = runner.invoke(app, ["info", "-m", str(converted / "mlx"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    cfg = json.loads((converted / "hf" / "config.json").read_text())
    assert info["model_type"] == "deepseek_v3"
    assert 4.0 < info["bits_per_weight"] < 6.5
    assert info["kv_bytes_per_token"] == cfg["num_hidden_layers"] * (
        cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4  # float32 activations on CPU
    assert info["mtp_bytes"] > 0
    r = runner.invoke(app, ["info", "-m", str(converted / "mlx")])
    assert "bits per weight" in r.stdout and "fits: yes" in r.stdout


def test_demo_runs_end_to_end():
    r = runner.invoke(app, ["demo", "--max-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert "demo ok" in r.stdout and "Generation: 8 tokens" in r.stderr


def test_chat_two_turns_then_quit(converted):
    r = runner.invoke(app, ["chat", "-m", str(converted / "mlx"), "-n", "6", "--temp", "0"],
                      input="hello\nsecond turn\n/quit\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("Generation: ") == 2 and r.stdout.count(">>> ") == 3
