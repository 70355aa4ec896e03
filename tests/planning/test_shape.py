"""Model shapes without weights: model_config_of's sources and meta_model."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.planning import shape as S
from loraforge.training import builtin
from loraforge.training.config import ConfigError


def test_builtin_config_is_the_built_models():
    real = builtin.build_model("builtin:tiny-llama")
    config = S.model_config_of("builtin:tiny-llama")
    assert config["hidden_size"] == real.config.hidden_size and config["vocab_size"] == real.config.vocab_size
    meta = S.meta_model(config)
    shapes = {n: p.shape for n, p in meta.named_parameters()}
    assert shapes == {n: p.shape for n, p in real.named_parameters()}
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_directory_and_json_file(tmp_path):
    model = builtin.build_model("builtin:tiny-llama")
    model.config.save_pretrained(tmp_path)  # config.json only: no weights needed
    assert S.model_config_of(tmp_path)["num_hidden_layers"] == 2
    assert S.model_config_of(tmp_path / "config.json")["num_hidden_layers"] == 2


def test_shipped_shape_by_name(tmp_path, monkeypatch):
    config = S.model_config_of("builtin:small-llama")
    (tmp_path / "my-shape.json").write_text(json.dumps(config))
    monkeypatch.setattr(S, "SHAPES_DIR", tmp_path)
    assert S.shipped_shapes() == ["my-shape"]
    assert S.model_config_of("my-shape")["hidden_size"] == 256


def test_meta_model_dtype_and_no_storage():
    meta = S.meta_model(S.model_config_of("builtin:tiny-llama"), torch.bfloat16)
    assert {p.dtype for p in meta.parameters()} == {torch.bfloat16}
    assert len(S.decoder_layers(meta)) == 2


@pytest.mark.parametrize("source,words", [
    ("builtin:no-such-model", "model.path"),
    ("no/such/dir/anywhere", "model.path"),
])  # fmt: skip
def test_unknown_sources_are_named(source, words):
    with pytest.raises(ConfigError, match=words):
        S.model_config_of(source)


def test_directory_without_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        S.model_config_of(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        S.model_config_of(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        S.model_config_of(bad)


def test_config_without_model_type_is_named():
    with pytest.raises(ConfigError, match="model_type"):
        S.meta_model({"hidden_size": 64})
    with pytest.raises(ConfigError, match="model_type 'nonsense'"):
        S.meta_model({"model_type": "nonsense"})
