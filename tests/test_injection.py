"""Injection on real (tiny) transformers architectures and target matching."""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stdout

import pytest
import torch
from conftest import MODELS, logits, randomize_lora, tiny_gpt2, tiny_llama

import loraforge as lf
from loraforge.layers import LoraLayer

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_all_linear_on_each_architecture_matches_peft(arch):
    base = MODELS[arch]()
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    theirs_wrapped = sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert _wrapped(ours) == theirs_wrapped
    assert "lm_head" not in " ".join(_wrapped(ours))  # the output head is never "all-linear"
    assert lf.count_parameters(ours) == (
        sum(p.numel() for p in theirs.parameters() if p.requires_grad),
        sum(p.numel() for p in theirs.parameters()),
    )


def test_fused_gpt2_c_attn_takes_lora_like_any_matrix(ids):
    base = tiny_gpt2()
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    layer = ours.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_B["default"].weight.shape == (96, 4)  # 3 × 32 fused q,k,v
    randomize_lora(ours)
    before = logits(ours, ids)
    lf.merge(ours)
    torch.testing.assert_close(logits(ours, ids), before, rtol=0, atol=1e-5)


def test_target_forms_list_regex_exclude_layers():
    m = lf.inject(tiny_llama(), lf.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert _wrapped(m) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    m = lf.inject(tiny_llama(), lf.LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert _wrapped(m) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    m = lf.inject(tiny_llama(), lf.LoraConfig(target_modules="all-linear", exclude_modules=["mlp.up_proj"]))
    assert not any("up_proj" in n for n in _wrapped(m)) and any("gate_proj" in n for n in _wrapped(m))
    m = lf.inject(tiny_llama(), lf.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    assert _wrapped(m) == ["model.layers.1.self_attn.q_proj"]
    m = lf.inject(tiny_gpt2(), lf.LoraConfig(target_modules=["c_attn"], layers_to_transform=0))
    assert _wrapped(m) == ["transformer.h.0.attn.c_attn"]


def test_no_match_lists_linear_names_and_leaves_model_untouched():
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError) as e:
        lf.inject(m, lf.LoraConfig(target_modules=["query", "value"]))
    msg = str(e.value)
    assert "matched no module" in msg and "q_proj" in msg and "down_proj" in msg
    assert not _wrapped(m) and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_bad_config_values_are_clear():
    with pytest.raises(ValueError, match="positive integer"):
        lf.LoraConfig(r=0)
    with pytest.raises(ValueError, match="positive integer"):
        lf.LoraConfig(r=-3)
    with pytest.raises(ValueError, match="bias"):
        lf.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="unknown LoRA config key"):
        lf.LoraConfig.from_dict({"r": 4, "lora_rank": 4})
    with pytest.raises(TypeError):
        lf.LoraConfig(rank=4)  # a plain dataclass: Python names the unexpected keyword
    with pytest.raises(ValueError, match="regex"):
        lf.LoraConfig(target_modules="q_proj(")
    with pytest.raises(ValueError, match="target_modules is required"):
        lf.inject(tiny_llama(), lf.LoraConfig())


def test_rank_and_alpha_patterns_match_peft(ids):
    base = tiny_llama()
    kw = dict(r=4, target_modules=["q_proj", "v_proj"])
    ours = lf.inject(
        copy.deepcopy(base),
        lf.LoraConfig(alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, **kw),
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, **kw),
    )
    q, v = ours.model.layers[0].self_attn.q_proj, ours.model.layers[0].self_attn.v_proj
    tq = theirs.base_model.model.model.layers[0].self_attn.q_proj
    tv = theirs.base_model.model.model.layers[0].self_attn.v_proj
    assert (q.r["default"], v.r["default"]) == (tq.r["default"], tv.r["default"]) == (4, 2)
    assert q.scaling["default"] == tq.scaling["default"] and v.scaling["default"] == tv.scaling["default"]


def test_modules_to_save_and_bias_modes(ids):
    from conftest import tiny_bert

    base = tiny_bert()
    m = lf.inject(
        copy.deepcopy(base),
        lf.LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"),
    )
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.key.bias" not in trainable
    m = lf.inject(copy.deepcopy(base), lf.LoraConfig(target_modules=["query"], bias="all"))
    assert "bert.encoder.layer.0.attention.self.key.bias" in {
        n for n, p in m.named_parameters() if p.requires_grad
    }


def test_print_trainable_parameters_format():
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    out = io.StringIO()
    with redirect_stdout(out):
        lf.print_trainable_parameters(m)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    ref = io.StringIO()
    with redirect_stdout(ref):
        theirs.print_trainable_parameters()
    assert out.getvalue() == ref.getvalue()
    assert out.getvalue().startswith("trainable params: 4,096 || all params: ")
