"""Every bad input: ConvertError with one line naming the file (and tensor), nothing left behind."""

import json
import shutil
import struct

import pytest

from test_convert_synth import build

from mlxkt.convert import ConvertError, convert

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build(tmp_path_factory.mktemp("pristine") / "src", "dsv3", fp8=True)


@pytest.fixture
def src(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "src")


def read(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(path, fn):
    header, data = read(path)
    fn(header)
    write(path, header, data)


def index_of(src):
    return json.loads((src / "model.safetensors.index.json").read_text())


def write_index(src, index):
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def first(src, shard, pred):
    header, _ = read(src / shard)
    return next(k for k in header if k != "__metadata__" and pred(k))


def expect_error(src, tmp_path, *needles):
    dst = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert(src, dst, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert e.value.exit_code != 0
    assert not dst.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "partial output left"
    return msg


def test_truncated_shard(src, tmp_path):
    p = src / SHARD2
    p.write_bytes(p.read_bytes()[:-1000])
    expect_error(src, tmp_path, SHARD2, "truncated")


def test_header_bomb(src, tmp_path):
    p = src / SHARD1
    p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:])
    expect_error(src, tmp_path, SHARD1, "header length")


def test_file_shorter_than_length_field(src, tmp_path):
    (src / SHARD1).write_bytes(b"\x01\x02")
    expect_error(src, tmp_path, SHARD1)


def test_header_not_json(src, tmp_path):
    p = src / SHARD1
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(raw[:8] + b"{not json" + b" " * (n - 9) + raw[8 + n:])
    expect_error(src, tmp_path, SHARD1, "JSON")


def test_missing_shard(src, tmp_path):
    (src / SHARD2).unlink()
    expect_error(src, tmp_path, SHARD2, "missing")


def test_tensor_in_two_shards(src, tmp_path):
    name = first(src, SHARD1, lambda k: k.endswith("layernorm.weight"))
    h1, d1 = read(src / SHARD1)
    h2, d2 = read(src / SHARD2)
    b0, b1 = h1[name]["data_offsets"]
    h2[name] = dict(h1[name], data_offsets=[len(d2), len(d2) + b1 - b0])
    write(src / SHARD2, h2, d2 + d1[b0:b1])
    expect_error(src, tmp_path, name, SHARD1, SHARD2)


def test_fp8_without_scale(src, tmp_path):
    name = first(src, SHARD1, lambda k: k.endswith("_scale_inv"))
    edit_header(src / SHARD1, lambda h: h.pop(name))
    index = index_of(src)
    index["weight_map"].pop(name)
    write_index(src, index)
    expect_error(src, tmp_path, name[: -len("_scale_inv")], "without")


def test_wrong_scale_shape(src, tmp_path):
    name = first(src, SHARD1, lambda k: k.endswith("q_b_proj.weight_scale_inv"))

    def fn(h):
        b0, b1 = h[name]["data_offsets"]
        h[name]["shape"] = [1, (b1 - b0) // 4]  # same bytes, wrong block grid ([2, 1] is right)

    edit_header(src / SHARD1, fn)
    expect_error(src, tmp_path, name, "scale shape")


def test_unknown_dtype(src, tmp_path):
    name = first(src, SHARD1, lambda k: k.endswith("norm.weight"))
    edit_header(src / SHARD1, lambda h: h[name].update(dtype="Q4"))
    expect_error(src, tmp_path, name, "dtype")


def test_unsupported_weight_dtype(src, tmp_path):
    name = first(src, SHARD1, lambda k: k.endswith("norm.weight"))

    def fn(h):
        n = h[name]["shape"][0]
        h[name].update(dtype="I16", shape=[n])  # same byte size as BF16, not a float

    edit_header(src / SHARD1, fn)
    expect_error(src, tmp_path, name, "dtype")


def test_shape_does_not_match_bytes(src, tmp_path):
    name = first(src, SHARD1, lambda k: k.endswith("o_proj.weight"))
    edit_header(src / SHARD1, lambda h: h[name].update(shape=[h[name]["shape"][0] + 1, h[name]["shape"][1]]))
    expect_error(src, tmp_path, name, "bytes")


def test_offsets_past_end(src, tmp_path):
    name = first(src, SHARD1, lambda k: True)

    def fn(h):
        b0, b1 = h[name]["data_offsets"]
        shift = 10**9
        h[name]["data_offsets"] = [b0 + shift, b1 + shift]

    edit_header(src / SHARD1, fn)
    expect_error(src, tmp_path, name, "past the end")


def test_overlapping_tensors(src, tmp_path):
    header, _ = read(src / SHARD1)
    a, b = [k for k in header if k.endswith("layernorm.weight")][:2]

    def fn(h):
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    edit_header(src / SHARD1, fn)
    expect_error(src, tmp_path, SHARD1, "overlap")


def test_negative_offsets(src, tmp_path):
    name = first(src, SHARD1, lambda k: True)
    edit_header(src / SHARD1, lambda h: h[name].update(data_offsets=[-4, h[name]["data_offsets"][1]]))
    expect_error(src, tmp_path, name, "data_offsets")


def test_duplicate_key_in_header(src, tmp_path):
    p = src / SHARD1
    header, data = read(p)
    name = next(k for k in header if k.endswith("norm.weight"))
    entry = json.dumps(header[name])
    blob = json.dumps(header).encode()
    blob = blob[:-1] + f', "{name}": {entry}}}'.encode()
    blob += b" " * (-len(blob) % 8)
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    expect_error(src, tmp_path, SHARD1, "duplicate")


def test_index_names_tensor_not_in_shard(src, tmp_path):
    index = index_of(src)
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = SHARD1
    write_index(src, index)
    expect_error(src, tmp_path, "model.layers.0.self_attn.ghost.weight", SHARD1)


def test_tensor_missing_from_index(src, tmp_path):
    index = index_of(src)
    name = next(k for k, v in index["weight_map"].items() if v == SHARD2)
    index["weight_map"].pop(name)
    write_index(src, index)
    expect_error(src, tmp_path, name, "index")


def test_unexpected_tensor_name(src, tmp_path):
    name = first(src, SHARD1, lambda k: k.endswith("input_layernorm.weight"))
    new = name.replace("input_layernorm", "mystery_norm")

    def fn(h):
        h[new] = h.pop(name)

    edit_header(src / SHARD1, fn)
    index = index_of(src)
    index["weight_map"][new] = index["weight_map"].pop(name)
    write_index(src, index)
    expect_error(src, tmp_path, new, "unexpected")


def test_missing_expert(src, tmp_path):
    names = [k for k in index_of(src)["weight_map"] if ".experts.3.up_proj.weight" in k and "layers.1." in k]
    index = index_of(src)
    for n in names:
        shard = index["weight_map"].pop(n)
        edit_header(src / shard, lambda h: h.pop(n))
    write_index(src, index)
    expect_error(src, tmp_path, "model.layers.1.mlp.switch_mlp.up_proj", "missing [3]")


def test_orphan_scale(src, tmp_path):
    index = index_of(src)
    name = next(k for k in index["weight_map"] if k.endswith("o_proj.weight") and "layers.0" in k)
    shard = index["weight_map"].pop(name)
    edit_header(src / shard, lambda h: h.pop(name))
    write_index(src, index)
    expect_error(src, tmp_path, name + "_scale_inv", "without a weight")


def test_kv_b_shape_disagrees_with_config(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["v_head_dim"] = 48
    (src / "config.json").write_text(json.dumps(config))
    expect_error(src, tmp_path, "kv_b_proj.weight", "config")


def test_unknown_model_type(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    expect_error(src, tmp_path, "config.json", "llama")


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    expect_error(src, tmp_path, "config.json")


def test_pickle_file(src, tmp_path):
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    expect_error(src, tmp_path, "pytorch_model.bin", "pickle")


def test_remote_code(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["model_file"] = "modeling_evil.py"
    (src / "config.json").write_text(json.dumps(config))
    (src / "modeling_evil.py").write_text("import os\n")
    expect_error(src, tmp_path, "config.json", "custom code")


def test_layer_beyond_mtp(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (src / "config.json").write_text(json.dumps(config))
    expect_error(src, tmp_path, "model.layers.2.", "beyond")


def test_already_converted(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    expect_error(src, tmp_path, "config.json", "already")


def test_bad_options(src, tmp_path):
    for kw in ({"bits": 7}, {"group_size": 48}, {"dtype": "int8"}, {"recipe": "nope"}):
        with pytest.raises(ConvertError) as e:
            convert(src, tmp_path / "out", progress=False, **kw)
        assert e.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_cli_one_line_error(src, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mlxkt.convert.cli import convert_command

    (src / SHARD2).unlink()
    app = typer.Typer()
    app.command()(convert_command)
    result = CliRunner().invoke(app, [str(src), str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and SHARD2 in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
