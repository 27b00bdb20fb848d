from mlxkt.config import ModelArgs, normalize_config
from mlxkt.models import UnsupportedModelError, get_model_classes
import pytest

RELEASED = {
    "model_type": "deepseek_v3", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
}


def test_transformers5_rope_parameters_read_like_released():
    t5 = dict(RELEASED)
    t5.pop("rope_theta")
    rs = dict(t5.pop("rope_scaling"))
    rs.pop("type")
    t5["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": 10000.0}
    a, b = ModelArgs.from_dict(RELEASED), ModelArgs.from_dict(t5)
    assert a.rope_theta == b.rope_theta == 10000.0
    for key in ("factor", "mscale", "mscale_all_dim", "original_max_position_embeddings"):
        assert a.rope_scaling[key] == b.rope_scaling[key]
    assert a.rope_scaling["type"] == b.rope_scaling["type"] == "yarn"


def test_default_rope_parameters_mean_no_scaling():
    c = dict(RELEASED, rope_scaling=None)
    c.pop("rope_theta")
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    a = ModelArgs.from_dict(c)
    assert a.rope_theta == 5e5 and a.rope_scaling is None


def test_kimi_alias_and_unknown_model_type():
    assert normalize_config({"model_type": "kimi_k2"})["model_type"] == "deepseek_v3"
    model_cls, _ = get_model_classes({"model_type": "kimi_k2"})
    assert model_cls.__module__ == "mlxkt.models.deepseek"
    with pytest.raises(UnsupportedModelError, match="llama"):
        get_model_classes({"model_type": "llama"})


def test_unknown_keys_kept_in_extra():
    a = ModelArgs.from_dict(dict(RELEASED, some_new_field=3))
    assert a.extra["some_new_field"] == 3 and a.num_key_value_heads == 2
