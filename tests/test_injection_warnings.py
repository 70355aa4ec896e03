"""inject / add_adapter / load_adapter (issue 14): new LoRA modules follow the model's eval mode;
target_modules entries and layers_to_transform indices that match nothing are reported."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import logits, randomize_lora, tiny_llama
from torch import nn

import loraforge as lf
from loraforge.layers import LoraLayer, ModulesToSave


def _dropouts(model):
    return [d for _, m in model.named_modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]


def _assert_deterministic(model, ids):
    torch.testing.assert_close(logits(model, ids), logits(model, ids), rtol=0, atol=0)


# -- item 8: new modules follow the wrapped layer's mode ------------------------------------------
def test_inject_into_eval_model_leaves_dropout_in_eval_mode(ids):
    m = tiny_llama()  # built in eval mode
    lf.inject(m, lf.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules="all-linear"))
    randomize_lora(m)
    assert _dropouts(m) and not any(d.training for d in _dropouts(m))
    _assert_deterministic(m, ids)


def test_add_adapter_to_wrapped_eval_layers_follows_eval_mode(ids):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lf.add_adapter(m, "other", lf.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    lf.set_adapter(m, "other")
    randomize_lora(m)
    assert not any(d.training for d in _dropouts(m))
    _assert_deterministic(m, ids)


def test_new_modules_in_a_training_model_train():
    m = tiny_llama().train()
    lf.inject(
        m, lf.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    assert all(d.training for d in _dropouts(m))
    assert m.lm_head.modules_to_save["default"].training


def test_modules_to_save_copy_follows_eval_mode():
    m = tiny_llama()
    lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    m.lm_head.original_module.train()  # the wrapper (eval) decides, not a stray child's mode
    lf.add_adapter(
        m, "b", lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    assert isinstance(m.lm_head, ModulesToSave) and not m.lm_head.modules_to_save["b"].training


def test_load_adapter_into_eval_model_is_deterministic(ids, tmp_path):
    trained = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=8, dropout=0.3, target_modules="all-linear"))
    randomize_lora(trained)
    lf.save_adapter(trained, tmp_path / "a")
    base = tiny_llama()
    assert not base.training
    lf.load_adapter(base, tmp_path / "a")
    assert not any(d.training for d in _dropouts(base))
    _assert_deterministic(base, ids)
    lf.load_adapter(base, tmp_path / "a", adapter="second")  # into already wrapped layers
    lf.set_adapter(base, "second")
    assert not any(d.training for d in _dropouts(base))
    _assert_deterministic(base, ids)


# -- item 11: target_modules entries that match nothing ---------------------------------------------
def test_unmatched_target_entry_warns_naming_it():
    m = tiny_llama()
    with pytest.warns(UserWarning, match=r"target_modules entries \['nonsense'\] match no module"):
        lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "nonsense"]))
    assert isinstance(m.model.layers[0].self_attn.q_proj, LoraLayer)  # the rest is applied


def test_unmatched_target_entry_with_strict_raises_and_leaves_model_untouched():
    m = tiny_llama()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"\['nonsense', 'qproj'\] match no module of LlamaForCausalLM"):
        lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "nonsense", "qproj"]), strict=True)
    assert not any(isinstance(mod, LoraLayer) for mod in m.modules())
    assert lf.list_adapters(m) == [] and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        lf.add_adapter(m, "b", lf.LoraConfig(r=4, alpha=8, target_modules=["v_proj", "nope"]), strict=True)
    assert lf.list_adapters(m) == ["default"]


def test_entry_naming_a_modules_to_save_module_is_not_reported():
    m = lf.inject(
        tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.add_adapter(m, "b", lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]), strict=True)
    assert isinstance(m.lm_head, ModulesToSave)


def test_all_matched_entries_give_no_warning():
    m = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "self_attn.v_proj", "lm_head"]))
        # an entry that matches only modules_to_save / excluded modules still names a module
        lf.add_adapter(
            m,
            "b",
            lf.LoraConfig(
                r=4,
                alpha=8,
                target_modules=["k_proj", "o_proj"],
                exclude_modules=["o_proj"],
                layers_to_transform=[1],
            ),
            strict=True,
        )


# -- item 16: layers_to_transform indices that do not exist -----------------------------------------
def test_missing_layer_index_is_named_with_the_valid_range():
    m = tiny_llama()  # layers 0 and 1
    with pytest.raises(ValueError, match=r"layer index \[99\] does not exist.*in layers 0-1"):
        lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], layers_to_transform=[99]))
    assert not any(isinstance(mod, LoraLayer) for mod in m.modules())


def test_some_missing_layer_indices_warn_or_raise_with_strict():
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], layers_to_transform=[1, 7, 99])
    with pytest.raises(ValueError, match=r"layer indices \[7, 99\] do not exist"):
        lf.inject(tiny_llama(), cfg, strict=True)
    m = tiny_llama()
    with pytest.warns(UserWarning, match=r"layer indices \[7, 99\] do not exist"):
        lf.inject(m, cfg)
    assert isinstance(m.model.layers[1].self_attn.q_proj, LoraLayer)
    assert not isinstance(m.model.layers[0].self_attn.q_proj, LoraLayer)


def test_layers_pattern_that_finds_no_index_says_so():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no module matched by target_modules has a layer index"):
        lf.inject(Flat(), lf.LoraConfig(r=2, alpha=2, target_modules=["q_proj"], layers_to_transform=[0]))


def test_load_adapter_reports_missing_layers(tmp_path):
    trained = lf.inject(
        tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], layers_to_transform=[1])
    )
    lf.save_adapter(trained, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(path.read_text())
    data["layers_to_transform"] = [99]
    path.write_text(json.dumps(data))
    m = tiny_llama()
    with pytest.raises(ValueError, match=r"layer index \[99\] does not exist.*0-1"):
        lf.load_adapter(m, tmp_path / "a")
    assert lf.list_adapters(m) == []
