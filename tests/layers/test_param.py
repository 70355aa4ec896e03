"""LoRA on bare parameters (target_parameters; PEFT's ParamWrapper), pinned against peft 0.21."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import loraforge as lf
from loraforge.layers.param import LoraParam

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


class Experts(nn.Module):
    """MoE-like experts: 3-D weights used through einsum (E × out × in) or bmm (E × in × out)."""

    def __init__(self, experts: int = 3, d: int = 8, h: int = 6, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        up, down = (
            ((experts, d, 2 * h), (experts, h, d)) if transposed else ((experts, 2 * h, d), (experts, d, h))
        )
        self.gate_up_proj = nn.Parameter(torch.randn(up) / d**0.5)
        self.down_proj = nn.Parameter(torch.randn(down) / h**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (E, n, d)
        if self.is_transposed:
            g = torch.bmm(x, self.gate_up_proj)
        else:
            g = torch.einsum("end,eod->eno", x, self.gate_up_proj)
        a, b = g.chunk(2, -1)
        h = nn.functional.silu(a) * b
        if self.is_transposed:
            return torch.bmm(h, self.down_proj)
        return torch.einsum("enh,edh->end", h, self.down_proj)


class Moe(nn.Module):
    def __init__(self, transposed: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = Experts(transposed=transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(self.proj(x))


def _x(seed: int = 5) -> torch.Tensor:
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(seed))


def _randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _pair(transposed: bool, **kw):
    """(loraforge model, PEFT model) with the same base and the same factors."""
    base = Moe(transposed)
    cfg = dict(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS, **kw)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    _randomize(theirs)
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig.from_dict(cfg))
    sd = peft.get_peft_model_state_dict(theirs)
    live = dict(ours.named_parameters())
    with torch.no_grad():
        for key, value in sd.items():
            name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            live[name].copy_(value)
    return base, ours, theirs


@pytest.mark.parametrize("transposed", [False, True])
def test_forward_and_gradients_match_peft(transposed):
    _, ours, theirs = _pair(transposed)
    x = _x()
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-6)
    assert (y_ours - Moe(transposed)(x)).abs().max() > 1e-2  # the adapter changes the output
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    g_theirs = {
        k.removeprefix("base_model.model."): p.grad for k, p in theirs.named_parameters() if p.requires_grad
    }
    g_ours = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert sorted(g_ours) == sorted(g_theirs) and len(g_ours) == 4
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("transposed", [False, True])
def test_files_both_ways_with_peft(tmp_path, transposed):
    base, ours, theirs = _pair(transposed)
    x = _x()
    lf.save_adapter(ours, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in keys.items()} == {
        "base_model.model.experts.base_layer.lora_A.weight": (6, 8),  # gate_up_proj: E·r × in
        "base_model.model.experts.base_layer.lora_B.weight": (12, 6),  # out × r·E
        "base_model.model.experts.lora_A.weight": (6, 6),  # down_proj
        "base_model.model.experts.lora_B.weight": (8, 6),
    }
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    mine = lf.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(mine(x), theirs(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_exact_and_unload(dtype):
    _, ours, theirs = _pair(False)
    ours.to(dtype)
    x = _x().to(dtype)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    y = ours(x)
    lf.merge(ours)
    assert lf.merged_adapters(ours) == ["default"]
    torch.testing.assert_close(ours(x), y, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.1)
    lf.unmerge(ours)
    for n, p in ours.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n  # bit for bit
    merged = lf.merge_and_unload(copy.deepcopy(ours).float())
    assert type(merged.experts) is Experts and not any("lora_" in n for n, _ in merged.named_parameters())
    reference = theirs.merge_and_unload()
    for name in ("gate_up_proj", "down_proj"):
        want = getattr(reference.experts, name)
        tol = 1e-6 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(getattr(merged.experts, name), want, rtol=0, atol=tol)


def test_disable_second_adapter_delete_unwraps():
    base, ours, _ = _pair(False)
    x = _x()
    with lf.disable_adapters(ours):
        torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)
    cfg = lf.LoraConfig(r=3, target_modules=[], target_parameters=TARGETS)
    lf.add_adapter(ours, "other", cfg)
    # the second adapter joins the existing wrappers (no third level of nesting), as in PEFT
    assert isinstance(ours.experts, LoraParam) and isinstance(ours.experts.base_layer, LoraParam)
    assert type(ours.experts.base_layer.base_layer) is Experts
    assert ours.experts.r == {"default": 2, "other": 3}
    lf.delete_adapter(ours, "default")
    assert ours.experts.r == {"other": 3}
    lf.delete_adapter(ours, "other")
    assert type(ours.experts) is Experts
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)


def test_linear_weight_as_a_parameter_matches_peft():
    base = Moe()
    cfg = dict(r=2, lora_alpha=2, target_modules=[], target_parameters=["proj.weight"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    _randomize(theirs)
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig.from_dict(cfg))
    with torch.no_grad():
        ours.proj.lora_A["default"].weight.copy_(theirs.base_model.model.proj.lora_A["default"].weight)
        ours.proj.lora_B["default"].weight.copy_(theirs.base_model.model.proj.lora_B["default"].weight)
    torch.testing.assert_close(ours(_x()), theirs(_x()), rtol=0, atol=1e-6)


def test_refusals_leave_the_model_untouched():
    model = Moe()
    for kw, match in [
        (dict(dropout=0.1), "dropout"),
        (dict(init="pissa"), "init='pissa'"),
        (dict(target_parameters=["nothing.here"]), "matched no parameter"),
        (dict(target_modules=["proj"], target_parameters=["proj.weight"]), "target_modules also adapts"),
    ]:
        cfg = dict(r=2, target_modules=[], target_parameters=TARGETS) | kw
        with pytest.raises(ValueError, match=match):
            lf.inject(model, lf.LoraConfig(**cfg))
        assert type(model.experts) is Experts and all(p.requires_grad for p in model.parameters())
    lf.inject(model, lf.LoraConfig(r=2, target_modules=[], target_parameters=TARGETS))
    with pytest.raises(ValueError, match="same parameters"):
        lf.add_adapter(model, "b", lf.LoraConfig(r=2, target_modules=[], target_parameters=TARGETS[:1]))
    with pytest.raises(RuntimeError, match="mixed-adapter"), lf.adapter_batch(model, ["default"] * 3):
        model(_x())
    with pytest.raises(ValueError, match="cannot be combined"):  # (expert-stacked factors)
        lf.add_weighted_adapter(model, ["default"], [1.0], "sum")


def _tiny_moe(kind: str):
    """A tiny transformers MoE with bare expert parameters: Qwen3-MoE (E × out × in, used through
    F.linear) or GPT-OSS (``is_transposed``: E × in × out)."""
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=32, moe_intermediate_size=8, num_experts=4, **common
        )
        model_class = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.GptOssConfig(intermediate_size=12, num_local_experts=4, sliding_window=8, **common)
        model_class = transformers.GptOssForCausalLM
    torch.manual_seed(0)
    base = model_class(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    return base


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_tiny_transformers_moe_matches_peft(tmp_path, kind):
    base = _tiny_moe(kind)
    assert getattr(base.model.layers[0].mlp.experts, "is_transposed", False) == (kind == "gpt_oss")
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets),
    )
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    want = theirs(input_ids=ids).logits
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert (want - base(input_ids=ids).logits).abs().max() > 1e-2
    lf.save_adapter(ours, tmp_path / "back")
    assert sorted(load_file(tmp_path / "back" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "adapter_model.safetensors")
    )


def test_target_parameters_alone_without_target_modules(tmp_path):
    base = Moe()
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, alpha=4, target_parameters=["gate_up_proj"]))
    _randomize(ours)
    assert isinstance(ours.experts, LoraParam) and type(ours.proj) is nn.Linear
    lf.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(theirs(_x()), ours(_x()), rtol=0, atol=1e-6)


def test_safe_merge_refuses_a_nan_factor():
    _, ours, _ = _pair(False)
    before = ours.experts.base_layer.base_layer.gate_up_proj.detach().clone()
    with torch.no_grad():
        ours.experts.base_layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="gate_up_proj"):
        lf.merge(ours, safe=True)
    assert lf.merged_adapters(ours) == []
    assert torch.equal(ours.experts.base_layer.base_layer.gate_up_proj, before)
