"""Many adapters on one base: switching, disabling, mixed batches, merge/unmerge, combination."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, randomize_lora, tiny_gpt2, tiny_llama
from torch import nn

import loraforge as lf
from loraforge.layers import LoraLayer

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

CFG = dict(r=4, alpha=8, target_modules="all-linear")


def _three_adapters(base=None):
    m = lf.inject(base if base is not None else tiny_llama(), lf.LoraConfig(**CFG), adapter="pirate")
    lf.add_adapter(m, "formal", lf.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    lf.add_adapter(m, "poet", lf.LoraConfig(r=8, alpha=8, target_modules=["k_proj", "embed_tokens"]))
    randomize_lora(m)
    return m


def test_switch_disable_delete(ids):
    base = tiny_llama()
    ref = logits(base, ids)
    m = _three_adapters(copy.deepcopy(base))
    assert lf.list_adapters(m) == ["pirate", "formal", "poet"]
    outs = {}
    for name in lf.list_adapters(m):
        lf.set_adapter(m, name)
        outs[name] = logits(m, ids)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}" in n for n in trainable)  # only the active adapter trains
    assert not torch.allclose(outs["pirate"], outs["formal"])
    with lf.disable_adapters(m):
        torch.testing.assert_close(logits(m, ids), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(m, ids), outs["poet"])  # back after the block
    lf.delete_adapter(m, "poet")
    assert lf.list_adapters(m) == ["pirate", "formal"]
    assert not any(".poet" in n for n, _ in m.named_parameters())
    assert type(m.model.embed_tokens) is nn.Embedding  # layer left without adapters is unwrapped
    with pytest.raises(KeyError, match=r"unknown adapter.*known adapters: \['formal', 'pirate'\]"):
        lf.set_adapter(m, "poet")


def test_mixed_batch_equals_per_adapter_runs_and_peft(ids):
    base = tiny_llama()
    m = _three_adapters(copy.deepcopy(base))
    names = ["pirate", "__base__", "formal"]
    per_row = []
    for i, name in enumerate(names):
        if name == "__base__":
            per_row.append(logits(base, ids[i : i + 1]))
        else:
            lf.set_adapter(m, name)
            per_row.append(logits(m, ids[i : i + 1]))
    with lf.adapter_batch(m, names):
        mixed = logits(m, ids)
    torch.testing.assert_close(mixed, torch.cat(per_row), rtol=0, atol=1e-5)
    # Same numbers as PEFT's adapter_names on the same weights, via the files.
    theirs = _to_peft(m, base, ["pirate", "formal"])
    with torch.no_grad():
        ref = theirs(ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, ref, rtol=0, atol=1e-5)


def _to_peft(m, base, names, tmp=None):
    import tempfile

    tmp = tempfile.mkdtemp()
    for n in names:
        lf.save_adapter(m, f"{tmp}/{n}", adapter=n)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{names[0]}", adapter_name=names[0])
    for n in names[1:]:
        theirs.load_adapter(f"{tmp}/{n}", adapter_name=n)
    return theirs.eval()


def test_mixed_batch_runs_base_once_and_no_loop_over_rows(ids):
    m = _three_adapters()
    calls = []
    layer = m.model.layers[0].self_attn.q_proj
    layer.base_layer.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
    lora_calls = []
    layer.lora_A["pirate"].register_forward_hook(lambda *a: lora_calls.append(1))
    big = torch.randint(0, 96, (64, 5))
    names = ["pirate", "formal", "__base__", "poet"] * 16
    with lf.adapter_batch(m, names):
        out = logits(m, big)
    assert calls == [64]  # the base matmul ran once, on the whole batch
    assert lora_calls == []  # factors are gathered, not applied module by module
    assert out.shape == (64, 5, 96)


def test_mixed_batch_stacks_are_kept_until_a_factor_changes(ids):
    """Inference reuses a layer's stacked factors from call to call (decoding) and from block to
    block (serving); an in-place update of a factor (an optimizer step, load_state_dict) makes the
    next call rebuild them, and so does another set of adapters; deleting an adapter drops them;
    with gradients on, nothing is kept and the factors get their gradients."""
    m = _three_adapters()
    layer = m.model.layers[0].self_attn.q_proj
    names = ["pirate", "formal", "__base__"]

    def one_at_a_time():
        rows = []
        for i, name in enumerate(names):
            if name == "__base__":
                with lf.disable_adapters(m):
                    rows.append(logits(m, ids[i : i + 1]))
            else:
                lf.set_adapter(m, name)
                rows.append(logits(m, ids[i : i + 1]))
        return torch.cat(rows)

    with lf.adapter_batch(m, names):
        first = logits(m, ids)
        stacks = layer.__dict__["_stack_cache"][1]
        again = logits(m, ids)
        assert layer.__dict__["_stack_cache"][1] is stacks and torch.equal(first, again)  # reused
        with torch.no_grad():
            layer.lora_B["formal"].weight.add_(0.5)  # in place: the version counter moves
        changed = logits(m, ids)
        assert layer.__dict__["_stack_cache"][1] is not stacks and not torch.equal(changed, first)
    torch.testing.assert_close(changed, one_at_a_time(), rtol=0, atol=1e-5)
    with lf.adapter_batch(m, names):  # the next block (a server's next batch): still kept
        assert torch.equal(logits(m, ids), changed)
        kept = layer.__dict__["_stack_cache"][1]
    other = ["formal", "formal", "__base__"]
    with lf.adapter_batch(m, other):  # another set of adapters: rebuilt
        logits(m, ids)
        assert layer.__dict__["_stack_cache"][1] is not kept
    lf.delete_adapter(m, "formal")
    assert "_stack_cache" not in layer.__dict__
    m = _three_adapters()
    layer = m.model.layers[0].self_attn.q_proj
    # training through a mixed batch: no cache, gradients reach each adapter's factors
    m.train()
    for p in m.parameters():
        p.grad = None
    for n in ("pirate", "formal"):
        for p in (layer.lora_A[n].weight, layer.lora_B[n].weight):
            p.requires_grad_(True)
    with lf.adapter_batch(m, names):
        m(ids).logits.square().mean().backward()
        assert layer.__dict__["_stack_cache"] is None
    grad = layer.lora_A["formal"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_mixed_batch_rejects_unknown_and_wrong_length(ids):
    m = _three_adapters()
    with pytest.raises(KeyError, match="known adapters"):
        with lf.adapter_batch(m, ["pirate", "nobody", "formal"]):
            pass
    with pytest.raises(ValueError, match="3 rows"):
        with lf.adapter_batch(m, ["pirate", "formal"]):
            logits(m, ids)


def test_switching_by_merge_keeps_base_within_1e6(ids):
    m = _three_adapters()
    layers = [mod for _, mod in m.named_modules() if isinstance(mod, LoraLayer)]
    original = [mod.base_layer.weight.detach().clone() for mod in layers]
    expected = {}
    for name in ("pirate", "formal", "poet"):
        lf.set_adapter(m, name)
        expected[name] = logits(m, ids)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        name = ["pirate", "formal", "poet"][torch.randint(0, 3, (1,), generator=g).item()]
        lf.unmerge(m)
        lf.set_adapter(m, name)
        lf.merge(m, name)
        if step % 50 == 0:
            torch.testing.assert_close(logits(m, ids), expected[name], rtol=0, atol=1e-5)
    lf.unmerge(m)
    drift = max((mod.base_layer.weight - w).abs().max().item() for mod, w in zip(layers, original))
    assert drift <= 1e-6, drift


def test_merge_guards(ids):
    m = _three_adapters()
    lf.set_adapter(m, "pirate")
    lf.merge(m)
    m.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        m(ids)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lf.adapter_batch(m, ["pirate"] * 3):
            pass
    with pytest.raises(KeyError, match="known adapters"):
        lf.merge(m, "nope")
    lf.unmerge(m)
    lf.unmerge(m)  # idempotent
    m(ids).logits.sum().backward()  # trains again once unmerged


def test_train_and_eval_never_merge(ids):
    m = _three_adapters()
    w = m.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    m.train()
    m.eval()
    assert torch.equal(m.model.layers[0].self_attn.q_proj.base_layer.weight, w)


def test_merge_and_unload_restores_original_classes(ids):
    base = tiny_gpt2()
    m = lf.inject(copy.deepcopy(base), lf.LoraConfig(**CFG))
    randomize_lora(m)
    expected = logits(m, ids)
    plain = lf.merge_and_unload(m)
    assert not any(isinstance(x, LoraLayer) for x in plain.modules())
    assert type(plain.transformer.h[0].attn.c_attn) is type(base.transformer.h[0].attn.c_attn)
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-5)
    m2 = lf.inject(copy.deepcopy(base), lf.LoraConfig(**CFG))
    randomize_lora(m2)
    torch.testing.assert_close(logits(lf.unload(m2), ids), logits(base, ids), rtol=0, atol=0)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(ids, combination):
    base = tiny_llama()
    m = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter="a"
    )
    lf.add_adapter(m, "b", lf.LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize_lora(m)
    theirs = _to_peft(m, base, ["a", "b"])
    theirs.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type=combination)
    theirs.set_adapter("mix")
    lf.add_weighted_adapter(m, ["a", "b"], [0.7, 0.3], "mix", combination=combination)
    lf.set_adapter(m, "mix")
    with torch.no_grad():
        ref = theirs(ids).logits
    torch.testing.assert_close(logits(m, ids), ref, rtol=0, atol=1e-5)
    if combination == "cat":  # exact: equals 0.7·ΔW_a + 0.3·ΔW_b
        q = m.model.layers[0].self_attn.q_proj
        want = 0.7 * q.delta_weight("a") + 0.3 * q.delta_weight("b")
        torch.testing.assert_close(q.delta_weight("mix"), want, rtol=0, atol=1e-6)
