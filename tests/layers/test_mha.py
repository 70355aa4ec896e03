"""LoRA on nn.MultiheadAttention (q/k/v in_proj + out_proj), pinned against PEFT's layer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_pin import close, peft_mha_out_proj_once, pin
from torch import nn

import loraforge as lf
from loraforge.layers import LoraMultiheadAttention
from loraforge.registry import registry

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")


class Net(nn.Module):
    def __init__(self, batch_first: bool = True, bias: bool = True, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias, **kw)
        self.lin = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x, mask=None):
        y, _ = self.attn(x, x, x, key_padding_mask=mask)
        return self.lin(y)

    def inputs(self):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 5, 8, generator=g)
        return (x if self.batch_first else x.transpose(0, 1),)


def _base(**kw) -> Net:
    torch.manual_seed(0)
    return Net(**kw).eval()


@pytest.mark.parametrize(
    "kw, cfg",
    [
        ({}, {"target_modules": ["attn"]}),
        ({"batch_first": False}, {"target_modules": ["attn", "lin"], "r": 4, "lora_alpha": 16}),
        ({"bias": False}, {"target_modules": ["attn"], "r": 3, "use_rslora": True, "lora_alpha": 5}),
        ({"add_bias_kv": True}, {"target_modules": ["attn"], "r": 2}),
    ],
)
def test_mha_pinned_against_peft(kw, cfg, tmp_path):
    base = _base(**kw)
    with peft_mha_out_proj_once():
        ours, _ = pin(base, cfg, base.inputs(), tmp_path)
    layer = ours.attn
    assert isinstance(layer, LoraMultiheadAttention)
    assert type(layer.base_layer.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_peft_0_21_adds_the_out_proj_update_twice(tmp_path):
    """The pin above corrects one PEFT bug (peft_pin.peft_mha_out_proj_once). Here, unpatched:
    PEFT's output is loraforge's with the out_proj B doubled (W' + 2·s·B'·A'), or, once PEFT is
    fixed (huggingface/peft PR #3774), loraforge's own."""
    base = _base()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, target_modules=["attn"])
    )
    theirs.save_pretrained(tmp_path)
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path).eval()
    (x,) = base.inputs()
    with torch.no_grad():
        expected = theirs.eval()(x)
        once = ours(x)
        ours.attn.out_proj_lora_B["default"].weight.mul_(2)
        twice = ours(x)
    assert (once - twice).abs().max() > 1e-3
    if (once - expected).abs().max() > 1e-4:
        close(twice, expected)


def test_mha_forward_matches_the_weights_it_merges_with_masks():
    base = _base()
    net = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, init=False, target_modules=["attn"]))
    (x,) = base.inputs()
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        unmerged = net(x, mask)
        layer = net.attn
        w_in = layer.base_layer.in_proj_weight + layer.delta_weight("default")
        w_out = layer.base_layer.out_proj.weight + layer.out_delta_weight("default")
        ref = copy.deepcopy(base)
        ref.attn.in_proj_weight.copy_(w_in)
        ref.attn.out_proj.weight.copy_(w_out)
        torch.testing.assert_close(unmerged, ref(x, mask), rtol=0, atol=1e-6)
        lf.merge(net)
        torch.testing.assert_close(net(x, mask), unmerged, rtol=0, atol=1e-6)
    plain = lf.merge_and_unload(net)
    assert type(plain.attn) is nn.MultiheadAttention and set(plain.state_dict()) == set(base.state_dict())


def test_mha_trains_both_projections_and_unloads_to_the_base():
    base = _base()
    net = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, target_modules=["attn"]))
    lf.add_adapter(net, "second", lf.LoraConfig(r=3, target_modules=["attn"]))
    (x,) = base.inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x), base(x), rtol=0, atol=0)  # B = 0: the base to start
    net.train()
    net(x).square().mean().backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {
        "attn.lora_A.default.weight",
        "attn.lora_B.default.weight",
        "attn.out_proj_lora_A.default.weight",
        "attn.out_proj_lora_B.default.weight",
    }
    assert net.attn.out_proj_lora_B["default"].weight.grad.abs().sum() > 0
    assert net.attn.lora_B["default"].weight.grad.abs().sum() > 0
    lf.delete_adapter(net, "default")
    assert net.attn.adapters == ["second"] and "default" not in net.attn.out_proj_lora_A
    plain = lf.unload(net)
    assert type(plain.attn) is nn.MultiheadAttention
    for k, v in plain.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k


@pytest.mark.parametrize(
    "kw, cfg, match",
    [
        ({"kdim": 4, "vdim": 4}, {}, "LoRA on nn.MultiheadAttention needs kdim = vdim = embed_dim"),
        ({}, {"lora_bias": True}, "lora_bias is not supported on nn.MultiheadAttention"),
        ({}, {"init": "olora"}, "init='olora' is not supported on nn.MultiheadAttention"),
        ({}, {"init": "pissa"}, "init='pissa' is not supported on nn.MultiheadAttention"),
    ],
)
def test_mha_refusals_leave_the_model_untouched(kw, cfg, match):
    net = _base(**kw)
    with pytest.raises(ValueError, match=f"target 'attn': {match}"):
        lf.inject(net, lf.LoraConfig(target_modules=["attn", "lin"], **cfg))
    assert type(net.attn) is nn.MultiheadAttention and type(net.lin) is nn.Linear


def test_mha_refuses_mixed_batches():
    net = lf.inject(_base(), lf.LoraConfig(r=2, target_modules=["attn"]))
    (x,) = net.inputs()
    with lf.adapter_batch(net, ["default", "__base__"]), pytest.raises(RuntimeError, match="mixed-adapter"):
        net(x)


def test_mha_safe_merge_names_the_broken_projection():
    net = lf.inject(_base(), lf.LoraConfig(r=2, init=False, target_modules=["attn"]))
    with torch.no_grad():
        net.attn.out_proj_lora_B["default"].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"adapter 'default' would put NaN/Inf into the out_proj.weight of 'attn'"
    ):
        lf.merge(net, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_out_proj_inside_attention_is_not_a_target_of_its_own():
    net = _base()
    with pytest.raises(
        ValueError, match="target 'attn.out_proj' is the out_proj of nn.MultiheadAttention 'attn'"
    ):
        lf.inject(net, lf.LoraConfig(target_modules=["out_proj"]))
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    # "all-linear" leaves it to LoRA on the attention module (which "all-linear" does not take)
    lf.inject(net, lf.LoraConfig(target_modules="all-linear"))
    assert registry(net).targets["default"] == ["lin"]
    (x,) = net.inputs()
    net(x)  # the attention still runs
    assert type(net.attn) is nn.MultiheadAttention
