"""PEFT-format files: layout, both directions with the real peft package, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_unchanged, logits, randomize_lora, snapshot, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import loraforge as lf
from loraforge.layers import LoraLayer

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def test_layout_keys_shapes(tmp_path):
    m = lf.inject(
        tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"]), adapter="pirate"
    )
    lf.save_adapter(m, tmp_path, adapter="pirate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 96)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    assert not any("pirate" in k for k in tensors)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] == ["embed_tokens", "q_proj"]
    assert list(cfg) == sorted(cfg)  # PEFT writes sorted keys
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_all_linear_is_saved_expanded(tmp_path):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=2, target_modules="all-linear"))
    lf.save_adapter(m, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, list) and "model.layers.1.mlp.down_proj" in targets and len(targets) == 14


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loraforge_file_loads_in_peft_with_same_logits(tmp_path, ids, arch):
    base = BUILDERS[arch]()
    m = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=4, alpha=16, target_modules="all-linear", use_rslora=True)
    )
    randomize_lora(m)
    expected = logits(m, ids)
    lf.save_adapter(m, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-5)
    assert (expected - logits(base, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_file_loads_in_loraforge_with_same_logits(tmp_path, ids, arch):
    base = BUILDERS[arch]()
    targets = ["q_proj", "v_proj", "embed_tokens"] if arch == "llama" else ["c_attn", "c_fc", "wte"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    randomize_lora(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_peft_multi_adapter_subfolder_and_modules_to_save_roundtrip(tmp_path, ids):
    base = tiny_bert()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"
    )
    first = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["query"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(copy.deepcopy(base), first, adapter_name="first")
    theirs.add_adapter("second", cfg)
    randomize_lora(theirs)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "modules_to_save.second" in n or n.endswith("base_layer.bias"):
                p.add_(0.5)
    theirs.set_adapter("second")
    theirs.eval()
    theirs.save_pretrained(tmp_path, selected_adapters=["second"])  # PEFT writes ./second/
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path, adapter="second")
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)
    lf.save_adapter(ours, tmp_path / "ours", adapter="second")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_adapter_for_another_base_is_refused_and_model_untouched(tmp_path):
    small = lf.inject(tiny_llama(), lf.LoraConfig(r=4, target_modules=["q_proj"]))
    lf.save_adapter(small, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    snap = snapshot(other)
    with pytest.raises(ValueError) as e:
        lf.load_adapter(other, tmp_path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(4, 32)" in msg and "(4, 48)" in msg
    assert_unchanged(other, snap)


def test_second_load_error_leaves_existing_adapters(tmp_path):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, target_modules=["q_proj"]), adapter="a")
    randomize_lora(m)
    lf.save_adapter(m, tmp_path / "a", adapter="a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    tensors.pop(next(iter(tensors)))
    (tmp_path / "b").mkdir()
    save_file(tensors, tmp_path / "b" / "adapter_model.safetensors")
    (tmp_path / "b" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    snap = snapshot(m)
    with pytest.raises(ValueError, match="missing"):
        lf.load_adapter(m, tmp_path / "b", adapter="b")
    assert_unchanged(m, snap)
    with pytest.raises(ValueError, match=r"already exists; known adapters: \['a'\]"):
        lf.load_adapter(m, tmp_path / "a", adapter="a")
    assert_unchanged(m, snap)


@pytest.mark.parametrize(
    "damage",
    [
        "no_dir",
        "no_config",
        "no_weights",
        "bad_json",
        "bad_tensors",
        "unknown_key",
        "r_zero",
        "pickle_only",
        "dora",
    ],
)
def test_missing_or_corrupt_files_are_clear(tmp_path, damage):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, target_modules=["q_proj"]))
    lf.save_adapter(m, tmp_path / "ad")
    d = tmp_path / "ad"
    cfg = json.loads((d / "adapter_config.json").read_text())
    expect = {
        "no_dir": (FileNotFoundError, "does not exist"),
        "no_config": (FileNotFoundError, "missing"),
        "no_weights": (FileNotFoundError, "missing"),
        "bad_json": (ValueError, "invalid JSON"),
        "bad_tensors": (ValueError, "not a readable safetensors"),
        "unknown_key": (ValueError, "unknown config key"),
        "r_zero": (ValueError, "positive integer"),
        "pickle_only": (ValueError, "safetensors"),
        "dora": (ValueError, "lora_magnitude_vector"),  # a DoRA config over a LoRA-only file
    }[damage]
    if damage == "no_dir":
        d = tmp_path / "nothing"
    elif damage == "no_config":
        (d / "adapter_config.json").unlink()
    elif damage in ("no_weights", "pickle_only"):
        (d / "adapter_model.safetensors").unlink()
        if damage == "pickle_only":
            (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    elif damage == "bad_json":
        (d / "adapter_config.json").write_text("{not json")
    elif damage == "bad_tensors":
        (d / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    else:
        cfg.update({"unknown_key": {"surprise": 1}, "r_zero": {"r": 0}, "dora": {"use_dora": True}}[damage])
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = tiny_llama()
    snap = snapshot(fresh)
    with pytest.raises(expect[0], match=expect[1]):
        lf.load_adapter(fresh, d)
    assert_unchanged(fresh, snap)


def test_writes_are_atomic(tmp_path, monkeypatch):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, target_modules=["q_proj"]))
    lf.save_adapter(m, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_lora(m)
    import loraforge.adapter_files as lfio

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lfio, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lf.save_adapter(m, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_scaling_is_recomputed_from_config(tmp_path, ids):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_lora(m)
    lf.save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = lf.load_adapter(tiny_llama(), tmp_path)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and layer.scaling["default"] == 4.0
