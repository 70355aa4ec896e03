"""The training config embeds the library's own config types (LoraConfig, QuantConfig), documents
every key once for ``loraforge train --help``, and the training package imports modules, not the
``loraforge`` facade."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from loraforge.demo.runs import QUICK, quant_config
from loraforge.quant import Linear4bit, QuantConfig, quantize
from loraforge.training.config import ConfigError, TrainConfig, _all_keys, describe_keys
from loraforge.training.resume import config_changes

SRC = Path(__file__).resolve().parents[2] / "src" / "loraforge"


def _cfg(**sections) -> TrainConfig:
    return TrainConfig.from_dict({"data": {"train": "x.jsonl"}, **sections})


def test_quantization_section_is_a_quant_config_with_dtype_names():
    cfg = _cfg(model={"quantization": {"compute_dtype": "bfloat16", "blocksize": 128}})
    q = cfg.model.quantization
    assert isinstance(q, QuantConfig)
    assert (q.compute_dtype, q.blocksize, q.skip_modules) == (torch.bfloat16, 128, ["lm_head"])
    assert cfg.to_dict()["model"]["quantization"]["compute_dtype"] == "bfloat16"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round trip through the plain form
    assert _cfg().model.quantization.compute_dtype == "auto"  # the model's dtype, as before


def test_bad_quantization_values_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.quantization\.compute_dtype: expected 'auto' \|"):
        _cfg(model={"quantization": {"compute_dtype": "fp8"}})
    with pytest.raises(ConfigError, match=r"model\.quantization\.quant_type: expected 'nf4' \| 'fp4'"):
        _cfg(model={"quantization": {"quant_type": "int4"}})
    with pytest.raises(ConfigError, match=r"model\.quantization: .*blocksize must be a power of two"):
        TrainConfig.from_dict({"data": {"train": "x"}}, ["model.quantization.blocksize=100"])


def test_config_saved_by_an_older_run_compares_equal_on_resume():
    """state.json of a run from before the change holds the section in the same plain form."""
    saved = json.loads(json.dumps(_cfg().to_dict()))
    saved["model"]["quantization"] = {
        "quant_type": "nf4",
        "blocksize": 64,
        "double_quant": True,
        "compute_dtype": "auto",
        "skip_modules": ["lm_head"],
    }
    assert config_changes(_cfg(), saved) == {}
    saved["model"]["quantization"]["compute_dtype"] = "float16"
    cfg = _cfg(model={"quantization": {"compute_dtype": "float16"}})
    assert config_changes(cfg, saved) == {}


def test_lora_training_defaults_have_one_home():
    """A partial lora section starts from the field's default (r=8, alpha=16, all-linear)."""
    default = TrainConfig().lora
    assert (default.r, default.alpha, default.target_modules) == (8, 16.0, "all-linear")
    assert _cfg().lora == default
    assert _cfg(lora={"dropout": 0.1}).lora == dataclasses.replace(default, dropout=0.1)
    assert TrainConfig.from_dict({"data": {"train": "x"}}, ["lora.lora_alpha=4"]).lora.alpha == 4.0


def test_help_documents_every_key():
    lines = describe_keys().splitlines()
    keys = _all_keys(TrainConfig)
    for key in keys:
        [i] = [i for i, line in enumerate(lines) if line.split()[0] == key]
        assert lines[i + 1].startswith("      ") and lines[i + 1].strip(), f"{key} has no documentation"
    text = describe_keys()
    assert "model.quantization.compute_dtype 'auto' | 'float32' | 'bfloat16' | 'float16'" in text
    assert "lora.r " in text and "the rank" in text
    assert "``" not in text and "torch.dtype default" not in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_compute_dtype_is_the_weights(dtype):
    model = quantize(nn.Sequential(nn.Linear(64, 32).to(dtype)), QuantConfig(compute_dtype="auto"))
    assert isinstance(model[0], Linear4bit) and model[0].compute_dtype == dtype
    assert model(torch.randn(2, 64, dtype=dtype)).dtype == dtype
    with pytest.raises(ValueError, match="resolved"):
        QuantConfig(compute_dtype="auto").to_transformers()


def test_demo_quantization_is_the_same_settings_as_before():
    """Finished demo runs are reused by comparing spec.json, which holds this dict."""
    assert quant_config(QUICK).to_dict() == {
        "quant_type": "nf4",
        "blocksize": QUICK.quant_blocksize,
        "double_quant": True,
        "compute_dtype": "float32",
        "skip_modules": ["lm_head"],
    }
    assert quant_config(QUICK).compute_dtype == torch.float32


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for inner in node.body:
                guarded |= {id(n) for n in ast.walk(inner) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node, [a.name for a in node.names], id(node) in guarded
        elif isinstance(node, ast.ImportFrom):
            yield node, [node.module or ""], id(node) in guarded


@pytest.mark.parametrize("path", sorted((SRC / "training").glob("*.py")), ids=lambda p: p.name)
def test_training_imports_modules_not_the_facade(path):
    for node, names, guarded in _imports(path):
        assert "loraforge" not in names, f"{path.name}:{node.lineno}: imports the loraforge facade"
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            # the package's own modules always ship: an import error there is a real error
            assert not guarded, f"{path.name}:{node.lineno}: a package import inside try"


def test_qlora_run_computes_in_the_models_dtype_by_default(tmp_path):
    import loraforge as lf

    from .util import tiny_config

    cfg = tiny_config(tmp_path / "run", method="qlora", train={"max_steps": 1})
    model, _ = lf.train(cfg)
    dtypes = {m.compute_dtype for m in model.modules() if isinstance(m, Linear4bit)}
    assert dtypes == {torch.float32}
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "compute_dtype: auto" in saved
