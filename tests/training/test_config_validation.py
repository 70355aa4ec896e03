"""Config hardening: finite numbers, PEFT's key names, suggestions for unknown keys, unreadable files."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.training import ConfigError, TrainConfig
from loraforge.training.config import DataSection, TrainSection


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key, shown",
    [
        ("train: {lr: .inf}", "train.lr", "inf"),
        ("train: {lr: -.inf}", "train.lr", "-inf"),
        ("train: {max_grad_norm: .nan}", "train.max_grad_norm", "nan"),
        ("train: {weight_decay: .nan}", "train.weight_decay", "nan"),
        ("train: {min_lr_ratio: .nan}", "train.min_lr_ratio", "nan"),
        ("train: {betas: [0.9, .inf]}", "train.betas[1]", "inf"),
        ("lora: {alpha: .inf}", "lora.alpha", "inf"),
        ("lora: {dropout: .nan}", "lora.dropout", "nan"),
        ("lora: {alpha_pattern: {q_proj: .inf}}", "lora.alpha_pattern.q_proj", "inf"),
        ("data: {train: a.jsonl, eval_fraction: .nan}", "data.eval_fraction", "nan"),
        ("train: {lr: 1" + "0" * 400 + "}", "train.lr", "an integer beyond the float range"),
    ],
)
def test_non_finite_numbers_are_refused_with_the_key(tmp_path, text, key, shown):
    path = write(tmp_path, "data: {train: a.jsonl}\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(path)
    assert str(e.value) == f"{path}: {key}: must be a finite number, got {shown}"


def test_non_finite_override_names_the_override(tmp_path):
    path = write(tmp_path, "data: {train: a.jsonl}\n")
    with pytest.raises(
        ConfigError, match=r"^command-line override 'train.lr=.inf': train.lr: must be a finite"
    ):
        TrainConfig.from_yaml(path, ["train.lr=.inf"])


def test_validate_refuses_non_finite_numbers_of_a_config_built_in_python():
    cfg = TrainConfig(data=DataSection(train="a.jsonl"), train=TrainSection(max_grad_norm=float("nan")))
    with pytest.raises(
        ConfigError, match=r"^<config>: train.max_grad_norm: must be a finite number, got nan"
    ):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"^<TrainConfig>: train.lr: must be a finite number"):
        TrainConfig.load(TrainConfig(data=DataSection(train="a.jsonl"), train=TrainSection(lr=float("inf"))))
    with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
        TrainConfig.load(
            TrainConfig(data=DataSection(train="a.jsonl"), train=TrainSection(lr=float("inf"))),
            ["train.seed=1"],
        )


def test_peft_names_in_the_lora_section(tmp_path):
    path = write(
        tmp_path,
        "data: {train: a.jsonl}\nlora: {r: 4, lora_alpha: 32, lora_dropout: 0.1, init_lora_weights: true}\n",
    )
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init) == (32.0, 0.1, "default")
    again = TrainConfig.from_yaml(path, ["lora.alpha=8", "lora.init_lora_weights=gaussian"])
    assert (again.lora.alpha, again.lora.init) == (8.0, "gaussian")  # the override wins
    assert TrainConfig.from_yaml(path, ["lora.lora_dropout=0.2"]).lora.dropout == 0.2
    # the resolved config (saved as config.yaml) uses loraforge's names and loads back
    assert "lora_alpha" not in cfg.to_yaml() and TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_peft_names_conflicts_and_unsupported_values(tmp_path):
    both = write(tmp_path, "data: {train: a.jsonl}\nlora: {alpha: 16, lora_alpha: 32}\n")
    with pytest.raises(
        ConfigError, match=r"run.yaml: lora: both 'alpha' and PEFT's name 'lora_alpha' are set"
    ):
        TrainConfig.from_yaml(both)
    corda = write(tmp_path, "data: {train: a.jsonl}\nlora: {init_lora_weights: corda}\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"b.yaml: lora: init_lora_weights='corda' is not supported: use"):
        TrainConfig.from_yaml(corda)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora: {rank: 4}", "unknown key 'lora.rank' (did you mean 'r'?)"),
        ("lora: {lora_r: 4}", "unknown key 'lora.lora_r' (did you mean 'r'?)"),
        ("train: {learning_rate: 1.0e-4}", "unknown key 'train.learning_rate' (did you mean 'lr'?)"),
        ("train: {gradient_accumulation_steps: 2}", "(did you mean 'grad_accum'?)"),
        ("lr: 1.0e-4", "unknown key 'lr' (did you mean 'train.lr'?)"),
        ("lora_alpha: 8", "unknown key 'lora_alpha' (did you mean 'lora.alpha'?)"),
        ("trian: {}", "unknown key 'trian' (did you mean 'train'?)"),
    ],
)
def test_unknown_keys_get_the_closest_known_key(tmp_path, text, message):
    path = write(tmp_path, "data: {train: a.jsonl}\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_unknown_override_gets_a_suggestion(tmp_path):
    path = write(tmp_path, "data: {train: a.jsonl}\n")
    with pytest.raises(
        ConfigError, match=r"override 'lora.rank=4': unknown key 'lora.rank' \(did you mean 'r'\?\)"
    ):
        TrainConfig.from_yaml(path, ["lora.rank=4"])


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read the config file"):
        TrainConfig.from_yaml(tmp_path)  # a directory
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# a config\ndata: {train: caf\xe9.jsonl}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{latin1}:2: not UTF-8 text \(byte 0xe9\)"):
        TrainConfig.from_yaml(latin1)
