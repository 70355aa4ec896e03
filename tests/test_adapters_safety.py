"""Merge / unmerge / switch / combine without silent wrong results (issue 14, items 12 and 13):
unmerge gives the base back bit for bit in every dtype, factors changed while merged, set_adapter
after merge, delete inside adapter_batch, add_weighted_adapter with modules_to_save."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, randomize_lora, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraforge as lf
from loraforge.layers import LoraLayer


class Net(nn.Module):
    """One layer of each kind whose weight merge touches: Linear (64 x 192, the 12,288 weights of
    the trial), embedding, GPT-2 Conv1D and Conv2d."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 192)
        self.lin = nn.Linear(192, 64)
        self.c1d = Conv1D(32, 64)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, ids):
        h = self.c1d(self.lin(self.emb(ids)))  # (batch, tokens, 32)
        return self.conv(h.reshape(h.shape[0], 2, -1, 4)).flatten(1)


TARGETS = ["emb", "lin", "c1d", "conv"]


def _net(dtype, seed=0):
    torch.manual_seed(seed)
    m = Net().to(dtype).eval()
    lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=TARGETS), adapter="small")
    lf.add_adapter(m, "big", lf.LoraConfig(r=8, alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in _layers(m):
            for name, scale in (("small", 0.01), ("big", 1.0)):
                a, b = layer.factors(name)
                a.copy_(torch.randn(a.shape, generator=g))
                b.copy_(torch.randn(b.shape, generator=g))
                # |ΔW| ≈ scale · |W0|: a trained adapter is ~1 %, "big" is as large as W0 itself
                ratio = layer.base_weight().float().std() / layer.delta_weight(name).std()
                b.mul_(scale * ratio)
    return m


def _layers(m):
    return [(n, mod) for n, mod in m.named_modules() if isinstance(mod, LoraLayer)]


def _weights(m):
    return {n: layer.base_layer.weight.detach().clone() for n, layer in _layers(m)}


def _assert_identical(m, before):
    for n, layer in _layers(m):
        w = layer.base_layer.weight
        diff = (w.float() - before[n].float()).abs()
        assert torch.equal(w, before[n]), f"{n}: {int((diff > 0).sum())} of {w.numel()} weights moved"


@pytest.mark.parametrize(
    "dtype, cycles", [(torch.bfloat16, 1000), (torch.float16, 1000), (torch.float32, 200)]
)
def test_thousand_switches_leave_the_base_bit_identical(dtype, cycles):
    m = _net(dtype)
    before = _weights(m)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = {}
    for name in ("small", "big"):
        lf.set_adapter(m, name)
        with torch.no_grad():
            expected[name] = m(ids).float()
    for step in range(cycles):
        name = "big" if step % 3 == 0 else "small"
        lf.unmerge(m)
        lf.set_adapter(m, name)
        lf.merge(m, name)
        if step % 100 == 0:  # merged outputs stay those of the adapter
            with torch.no_grad():
                got = m(ids).float()
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(got, expected[name], rtol=tol, atol=tol * expected[name].abs().max())
    lf.unmerge(m)
    _assert_identical(m, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merging_several_and_unmerging_in_any_order_is_exact(dtype):
    m = _net(dtype)
    before = _weights(m)
    lf.merge(m, ["small", "big"])
    assert lf.merged_adapters(m) == ["small", "big"]
    lf.unmerge(m, "small")  # the first merged, taken out from under the second
    assert lf.merged_adapters(m) == ["big"]
    lf.merge(m, "small")
    lf.unmerge(m, "big")
    lf.unmerge(m, "small")
    _assert_identical(m, before)
    with lf.disable_adapters(m):
        pass
    lf.merge(m, "big")
    with lf.disable_adapters(m):
        _assert_identical(m, before)  # disabled = the base, exactly
    lf.unmerge(m)
    _assert_identical(m, before)


def test_restore_memory_is_small_for_a_trained_size_adapter():
    m = _net(torch.bfloat16)
    lf.merge(m, "small")
    for name, layer in _layers(m):
        record = layer._merge_record
        weight_bytes = layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
        factor_bytes = sum(t.numel() * t.element_size() for t in layer.factors("small"))
        assert record.copy is None, name  # misses only, no full copy
        assert record.nbytes() - factor_bytes < 0.25 * weight_bytes, (name, record.nbytes(), weight_bytes)
    lf.unmerge(m)
    lf.merge(m, "big")  # |ΔW| ≈ |W0|: a third of the weights miss; a copy is never larger than W0
    for _, layer in _layers(m):
        w = layer.base_layer.weight
        factor_bytes = sum(t.numel() * t.element_size() for t in layer.factors("big"))
        assert layer._merge_record.nbytes() - factor_bytes <= w.numel() * w.element_size()
    lf.unmerge(m)


def test_factors_changed_while_merged_unmerge_exactly_and_warn():
    m = _net(torch.bfloat16)
    before = _weights(m)
    lf.merge(m, "small")
    with torch.no_grad():
        m.lin.lora_B["small"].weight.mul_(3)  # e.g. a load_state_dict or a stray optimizer step
    with pytest.warns(UserWarning, match=r"factors of \['small'\] changed while merged"):
        lf.unmerge(m)
    _assert_identical(m, before)


def test_matmul_precision_changed_while_merged_does_not_matter():
    m = _net(torch.float32)
    before = _weights(m)
    previous = torch.get_float32_matmul_precision()
    try:
        lf.merge(m, "small")
        assert m.lin._merge_record.copy is None  # restored from the misses: ΔW is recomputed
        torch.set_float32_matmul_precision("medium")
        lf.unmerge(m)
        assert torch.get_float32_matmul_precision() == "medium"  # the user's setting is kept
    finally:
        torch.set_float32_matmul_precision(previous)
    _assert_identical(m, before)


def test_set_adapter_unmerges_adapters_that_stop_being_active(ids):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lf.add_adapter(m, "b", lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"]))
    randomize_lora(m)
    lf.set_adapter(m, "b")
    want_b = logits(m, ids)
    lf.set_adapter(m, "default")
    lf.merge(m, "default")
    with pytest.warns(UserWarning, match=r"set_adapter: unmerging \['default'\]"):
        lf.set_adapter(m, "b")
    assert lf.merged_adapters(m) == []
    torch.testing.assert_close(logits(m, ids), want_b, rtol=0, atol=1e-6)  # b alone, not b + default
    lf.merge(m, "b")
    lf.set_adapter(m, ["b", "default"])  # b stays active: stays merged, no warning needed
    assert lf.merged_adapters(m) == ["b"]


def test_delete_adapter_inside_adapter_batch_raises(ids):
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lf.add_adapter(m, "b", lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_lora(m)
    with lf.adapter_batch(m, ["default", "b", "__base__"]):
        want = logits(m, ids)
        with pytest.raises(RuntimeError, match="'b' is in use by an adapter_batch block"):
            lf.delete_adapter(m, "b")
        torch.testing.assert_close(logits(m, ids), want, rtol=0, atol=0)  # nothing changed
    assert lf.list_adapters(m) == ["default", "b"]
    lf.delete_adapter(m, "b")  # fine after the block


def test_quantized_base_merge_unmerge_restores_packed_weight_exactly():
    from loraforge.quant import QuantConfig

    m = lf.quantize(tiny_llama().float(), QuantConfig(compute_dtype=torch.float32))
    lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    randomize_lora(m)
    layer = m.model.layers[0].self_attn.q_proj
    packed, absmax = layer.base_layer.weight.clone(), layer.base_layer.quant_state.absmax.clone()
    for _ in range(3):
        with pytest.warns(UserWarning, match="requantization"):
            lf.merge(m)
        assert not torch.equal(layer.base_layer.weight, packed)
        lf.unmerge(m)
    assert torch.equal(layer.base_layer.weight, packed)
    assert torch.equal(layer.base_layer.quant_state.absmax, absmax)


# -- item 13: add_weighted_adapter and modules_to_save --------------------------------------------
def _with_saved(owners):
    m = tiny_llama()
    for i, name in enumerate(["a", "b"]):
        saved = ["lm_head"] if name in owners else None
        cfg = lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=saved)
        if i == 0:
            lf.inject(m, cfg, adapter=name)
        else:
            lf.add_adapter(m, name, cfg)
    randomize_lora(m)
    with torch.no_grad():
        for copy in m.lm_head.modules_to_save.values():
            copy.weight.normal_()  # "trained"
    return m


def test_weighted_adapter_of_two_modules_to_save_copies_is_refused():
    m = _with_saved({"a", "b"})
    with pytest.raises(ValueError, match=r"own trained copy of modules_to_save \['lm_head'\]"):
        lf.add_weighted_adapter(m, ["a", "b"], [0.5, 0.5], "mix")
    assert lf.list_adapters(m) == ["a", "b"]
    assert not any("mix" in n for n, _ in m.named_parameters())


def test_weighted_adapter_takes_the_one_trained_modules_to_save_copy(ids):
    m = _with_saved({"a"})
    lf.add_weighted_adapter(m, ["a", "b"], [0.5, 0.5], "mix", combination="cat")
    saved = m.lm_head.modules_to_save
    assert torch.equal(saved["mix"].weight, saved["a"].weight)
    assert not torch.equal(saved["mix"].weight, m.lm_head.original_module.weight)
    assert lf.list_adapters(m) == ["a", "b", "mix"]
