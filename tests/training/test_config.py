"""Typed config: YAML values, dotted overrides, and errors that name the key and the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.training import ConfigError, TrainConfig
from loraforge.training.builtin import ASSETS
from loraforge.training.config import describe_keys

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\ntrain:\n  lr: 1e-4\n  max_steps: 10\nlora:\n  r: 4\n")
    cfg = TrainConfig.from_yaml(path, ["lora.r=32", "train.betas=[0.9, 0.95]", "model.dtype=bfloat16"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 would read a string
    assert cfg.lora.r == 32 and cfg.lora.alpha == 16.0 and cfg.lora.target_modules == "all-linear"
    assert cfg.train.betas == [0.9, 0.95] and cfg.model.dtype == "bfloat16"
    assert cfg.train.max_steps == 10 and cfg.data.train == "a.jsonl"
    # the resolved config round-trips
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "text, key",
    [
        ("data: {train: a.jsonl}\ntrian: {lr: 1}\n", "'trian'"),
        ("data: {train: a.jsonl, max_lenght: 5}\n", "'data.max_lenght'"),
        ("data: {train: a.jsonl}\nlora: {rank: 4}\n", "'lora.rank'"),
    ],
)
def test_unknown_keys_name_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'max_length'"):
        TrainConfig.from_yaml(write(tmp_path, "data: {train: a.jsonl, max_lenght: 5}\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("data: {train: a.jsonl}\ntrain: {batch_size: four}\n", "train.batch_size"),
        ("data: {train: a.jsonl}\ntrain: {lr: true}\n", "train.lr"),
        ("data: {train: a.jsonl, packing: 'yes'}\n", "data.packing"),
        ("data: {train: a.jsonl}\ntrain: {schedule: exponential}\n", "train.schedule"),
        ("data: {train: a.jsonl}\nmethod: adalora\n", "method"),
        ("data: {train: a.jsonl}\nlora: {target_modules: 5}\n", "lora.target_modules"),
        ("data: {train: a.jsonl}\ntrain: 3\n", "train"),
    ],
)
def test_wrong_types_name_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml.*lora.*positive integer"):
        TrainConfig.from_yaml(write(tmp_path, "data: {train: a.jsonl}\nlora: {r: 0}\n"))
    with pytest.raises(ConfigError, match=r"run.yaml: train.batch_size: must be > 0"):
        TrainConfig.from_yaml(write(tmp_path, "data: {train: a.jsonl}\ntrain: {batch_size: 0}\n"))
    with pytest.raises(ConfigError, match=r"data.train: required"):
        TrainConfig.from_yaml(write(tmp_path, "train: {lr: 1.0e-3}\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        TrainConfig.from_yaml(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, "data: {train: a.jsonl}\n")
    with pytest.raises(ConfigError, match=r"override 'lora.rr=3'.*unknown key 'lora.rr'"):
        TrainConfig.from_yaml(path, ["lora.rr=3"])
    with pytest.raises(ConfigError, match=r"override 'train.lr=fast'.*train.lr: expected float"):
        TrainConfig.from_yaml(path, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        TrainConfig.from_yaml(path, ["train.lr"])
    with pytest.raises(ConfigError, match="has no sub-keys"):
        TrainConfig.from_yaml(path, ["output.x=1"])


def test_quickstart_config_is_the_packaged_one():
    packaged = ASSETS / "quickstart" / "quickstart.yaml"  # one file: configs/ links to it
    assert (REPO / "configs" / "quickstart.yaml").resolve() == packaged.resolve()


def test_every_example_config_parses():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for path in files:
        if path.name.startswith("plan_"):  # (sizing examples for `loraforge plan`: no data to train on)
            from loraforge.planning import load_config

            load_config(path)
        else:
            TrainConfig.from_yaml(path)


def test_describe_keys_lists_every_key():
    text = describe_keys()
    keys = ("method", "model.quantization.quant_type", "lora.r", "data.packing", "train.save_every")
    for key in keys:
        assert key in text
