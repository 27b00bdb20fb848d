"""MLX directories made by others load as they are: mlx-community's older DeepSeek layout
(quantized kv_b_proj instead of embed_q/unembed_out) gives the same model."""

import json
import shutil

import mlx.core as mx
import pytest

import mlxkt
from mlxkt.convert import convert
from mlxkt.demo import DEMO_CONFIG, write_release_checkpoint

TOKENS = mx.array([[5, 17, 99, 42, 7, 250, 31, 8]])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    src = write_release_checkpoint(root / "hf")
    return convert(src, root / "mlx", bits=4, group_size=64, progress=False)


def to_old_layout(src, dst):
    """Merge embed_q/unembed_out back into a 4-bit kv_b_proj, as early R1 conversions had."""
    shutil.copytree(src, dst)
    c = DEMO_CONFIG
    H, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
    for f in dst.glob("model*.safetensors"):
        w = dict(mx.load(str(f)))
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn"
            if f"{p}.embed_q.weight" not in w:
                continue
            parts = []
            for name in ("embed_q", "unembed_out"):
                t = w.pop(f"{p}.{name}.weight")
                if f"{p}.{name}.scales" in w:
                    t = mx.dequantize(t, w.pop(f"{p}.{name}.scales"), w.pop(f"{p}.{name}.biases"),
                                      group_size=64, bits=4)
                parts.append(t)
            wk, wv = parts  # [H, r, nope], [H, v, r]
            kv_b = mx.concatenate([wk.swapaxes(1, 2), wv], axis=1).reshape(-1, wk.shape[1])
            q, s, b = mx.quantize(kv_b, group_size=64, bits=4)
            w[f"{p}.kv_b_proj.weight"], w[f"{p}.kv_b_proj.scales"], w[f"{p}.kv_b_proj.biases"] = q, s, b
        mx.save_safetensors(str(f), w, metadata={"format": "mlx"})
    index = dst / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        shard = next(iter(idx["weight_map"].values()))
        names = {k for f in dst.glob("model*.safetensors") for k in mx.load(str(f))}
        idx["weight_map"] = {k: shard for k in names}
        index.write_text(json.dumps(idx))
    assert nope == c["qk_nope_head_dim"] and H == c["num_attention_heads"]
    return dst


def test_old_kv_b_proj_layout_loads(converted, tmp_path):
    model, _ = mlxkt.load(converted, mtp=False)
    ref = model(TOKENS)
    old, _ = mlxkt.load(to_old_layout(converted, tmp_path / "old"), mtp=False)
    out = old(TOKENS)
    assert (mx.argmax(ref, -1) == mx.argmax(out, -1)).mean().item() >= 0.75
    a, b = ref.flatten(), out.flatten()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert corr.item() > 0.98


def test_mlx_lm_loads_our_conversion(converted):
    from mlx_lm import load as mlx_lm_load

    theirs, _ = mlx_lm_load(str(converted))
    ours, _ = mlxkt.load(converted, mtp=False, dtype=mx.bfloat16)
    a, b = theirs(TOKENS).astype(mx.float32), ours(TOKENS).astype(mx.float32)
    assert (mx.argmax(a, -1) == mx.argmax(b, -1)).mean().item() >= 0.75
    assert mx.abs(a - b).max().item() < 0.1 * mx.abs(a).max().item()
