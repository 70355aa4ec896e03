"""Trainable embedding rows (trainable_token_indices; PEFT's TrainableTokens) beside LoRA, pinned
against peft 0.21: keys, forward, gradients, tying, merge/unmerge, files both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import loraforge as lf
from loraforge import adapter_files
from loraforge.layers.trainable_tokens import TrainableTokens

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

IDS = torch.tensor([[3, 7, 11, 5, 3, 40], [11, 2, 7, 9, 1, 3]])
DELTA = "token_adapter.trainable_tokens_delta"


def _perturb(model, seed: int = 1) -> None:
    """Move every trainable tensor (LoRA factors and trained rows) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _pair(build, tti, targets=("q_proj",)):
    base = build()
    cfg = dict(r=2, lora_alpha=4, target_modules=list(targets), trainable_token_indices=tti)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    _perturb(theirs)
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig.from_dict(cfg))
    sd = peft.get_peft_model_state_dict(theirs)
    live = adapter_files._live_tensors(ours, "default")
    assert sorted(live) == sorted(sd)  # the same tensors under the same keys
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(sd[key])
    return base, ours, theirs


def test_untied_llama_list_targets_input_embedding_only():
    base, ours, theirs = _pair(tiny_llama, [3, 7, 11])
    assert isinstance(ours.model.embed_tokens, TrainableTokens)
    assert not isinstance(ours.lm_head, TrainableTokens)  # tie_word_embeddings is false
    key = f"base_model.model.model.embed_tokens.{DELTA}"
    assert tuple(adapter_files.adapter_state_dict(ours)[key].shape) == (3, 32)
    want = logits(theirs, IDS)
    torch.testing.assert_close(logits(ours, IDS), want, rtol=0, atol=1e-5)
    assert (want - logits(base, IDS)).abs().max() > 1e-3
    # only the chosen rows and the LoRA factors train
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert f"model.embed_tokens.{DELTA}.default" in trainable and len(trainable) == 5


def test_gradients_match_peft_and_touch_only_the_rows():
    _, ours, theirs = _pair(tiny_llama, [3, 7, 11])
    ours.train(), theirs.train()
    for m in (ours, theirs):
        out = m(input_ids=IDS).logits
        out.square().mean().backward()
    g_ours = dict((n, p.grad) for n, p in ours.named_parameters() if p.requires_grad)
    g_theirs = {
        n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert sorted(g_ours) == sorted(g_theirs)
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-6)
    assert ours.model.embed_tokens.base_layer.weight.grad is None


def test_tied_gpt2_head_follows_the_rows():
    base, ours, theirs = _pair(tiny_gpt2, [3, 7], targets=("c_attn",))
    head = ours.lm_head
    assert isinstance(head, TrainableTokens) and head.source is ours.transformer.wte
    keys = [k for k in adapter_files.adapter_state_dict(ours) if "token" in k]
    assert keys == [f"base_model.model.transformer.wte.{DELTA}"]  # the tied head saves nothing
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), rtol=0, atol=1e-5)
    # the head scores tokens 3 and 7 with the trained rows
    h = torch.randn(1, 32)
    torch.testing.assert_close(head(h)[0, [3, 7]], h[0] @ ours.transformer.wte.rows("default")[1].T)


@pytest.mark.parametrize("tti", [{"wte": [3, 7], "lm_head": [3, 7]}, {"wte": [3, 7], "lm_head": [1, 2]}])
def test_dict_forms_on_tied_gpt2_match_peft(tmp_path, tti):
    base, ours, theirs = _pair(tiny_gpt2, tti, targets=("c_attn",))
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path)
    mine = lf.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(mine, IDS), logits(theirs, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_files_both_ways(tmp_path, build):
    targets = ("q_proj",) if build is tiny_llama else ("c_attn",)
    base, ours, theirs = _pair(build, [3, 7, 11], targets=targets)
    lf.save_adapter(ours, tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        peft.get_peft_model_state_dict(theirs)
    )
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded, IDS), logits(ours, IDS), rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    mine = lf.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(mine, IDS), logits(theirs, IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merge_writes_rows_and_unmerge_is_exact(build):
    targets = ("q_proj",) if build is tiny_llama else ("c_attn",)
    base, ours, theirs = _pair(build, [3, 7, 11], targets=targets)
    table = adapter_files._live_tensors
    emb = ours.get_input_embeddings()
    before = emb.base_layer.weight.detach().clone()
    want = logits(ours, IDS)
    lf.merge(ours)
    rows = table(ours, "default")[next(k for k in table(ours, "default") if "token" in k)]
    assert torch.equal(emb.base_layer.weight[[3, 7, 11]], rows.detach())
    torch.testing.assert_close(logits(ours, IDS), want, rtol=0, atol=1e-5)
    lf.unmerge(ours)
    assert torch.equal(emb.base_layer.weight, before)
    merged = lf.merge_and_unload(copy.deepcopy(ours))
    assert not any(isinstance(m, TrainableTokens) for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDS), want, rtol=0, atol=1e-5)
    reference = theirs.merge_and_unload()
    torch.testing.assert_close(
        merged.get_input_embeddings().weight, reference.get_input_embeddings().weight, rtol=0, atol=0
    )


def test_two_adapters_mixed_batch_disable_delete():
    base = tiny_llama()
    model = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3])
    )
    lf.add_adapter(model, "b", lf.LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices=[3, 7]))
    _perturb(model, 2)
    lf.set_adapter(model, "b")
    _perturb(model, 3)
    per = {}
    for name in ("default", "b"):
        lf.set_adapter(model, name)
        per[name] = logits(model, IDS)
    with lf.adapter_batch(model, ["b", "default"]):
        mixed = logits(model, IDS)
    torch.testing.assert_close(mixed[0], per["b"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], per["default"][1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        lf.set_adapter(model, ["default", "b"])
        logits(model, IDS)
    # a serving step: one adapter per token, at the embedding
    from loraforge.adapters import set_token_plan
    from loraforge.layers.tokens import TokenPlan

    emb, tokens = model.model.embed_tokens, torch.tensor([[3, 7, 3, 7, 11]])
    names = ["b", "b", "default", None, "default"]
    each = {}
    for name in ("default", "b"):
        lf.set_adapter(model, name)
        each[name] = emb(tokens)[0]
    plan = TokenPlan(min_rows=1)
    set_token_plan(model, plan)
    plan.set(names, order=["default", "b"])
    out = emb(tokens)[0]
    plan.clear()
    for t, name in enumerate(names):
        want = each[name][t] if name else emb.base_layer(tokens)[0, t]
        assert torch.equal(out[t], want.to(out.dtype)), t
    lf.set_adapter(model, "default")
    with lf.disable_adapters(model):
        torch.testing.assert_close(logits(model, IDS), logits(base, IDS), rtol=0, atol=0)
    lf.delete_adapter(model, "b")
    assert model.model.embed_tokens.r == {"default": 1}
    with pytest.raises(ValueError, match="cannot be combined"):
        lf.add_weighted_adapter(model, ["default"], [1.0], "sum")
    lf.unload(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_refusals_leave_the_model_untouched():
    model = tiny_llama()
    for kw, match in [
        (dict(trainable_token_indices=[3, 500]), "out of range"),
        (dict(trainable_token_indices={"nowhere": [1]}), "matches no module"),
        (dict(target_modules=["embed_tokens"], trainable_token_indices=[1]), "not both"),
        (dict(modules_to_save=["embed_tokens"], trainable_token_indices=[1]), "not both"),
    ]:
        cfg = dict(r=2, target_modules=["q_proj"]) | kw
        with pytest.raises(ValueError, match=match):
            lf.inject(model, lf.LoraConfig(**cfg))
        assert type(model.model.embed_tokens) is torch.nn.Embedding
        assert not any("lora_" in n for n, _ in model.named_parameters())


def test_smollm2_tied_embeddings_round_trip_with_peft(smollm2_dir, tmp_path):
    """SmolLM2 ties lm_head to embed_tokens: the head is wrapped tied, PEFT loads the file alike."""
    base = lf.load_model("builtin:smollm2")
    ids = torch.tensor([[1, 2, 504, 28, 49151, 2]])
    want_base = logits(base, ids)
    cfg = lf.LoraConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[0], trainable_token_indices=[2, 49151]
    )
    ours = lf.inject(base, cfg)
    assert isinstance(ours.lm_head, TrainableTokens) and ours.lm_head.source is ours.model.embed_tokens
    _perturb(ours)
    want = logits(ours, ids)
    assert (want - want_base).abs().max() > 1e-2
    lf.save_adapter(ours, tmp_path)
    lf.unload(ours)  # the same module object back, its table untouched
    torch.testing.assert_close(logits(base, ids), want_base, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    assert type(theirs.base_model.model.lm_head).__name__ == "TrainableTokensWrapper"
    torch.testing.assert_close(logits(theirs, ids), want, rtol=0, atol=1e-4)


class _Scaled(torch.nn.Embedding):
    """An embedding whose forward scales (as Gemma's): only its own forward knows how."""

    def forward(self, x):
        return super().forward(x) * 2.5


@pytest.mark.parametrize("kind", ["plain", "scaled", "padding"])
def test_every_embedding_path_gives_the_replaced_rows(kind):
    torch.manual_seed(0)
    emb = {
        "plain": torch.nn.Embedding(20, 4),
        "scaled": _Scaled(20, 4),
        "padding": torch.nn.Embedding(20, 4, padding_idx=3),
    }[kind]
    holder = TrainableTokens(emb)
    holder.add_tokens("default", [3, 5])
    holder.active_adapters = ["default"]
    with torch.no_grad():
        holder.rows("default")[1].add_(1.0)
    x = torch.tensor([[3, 1, 5, 3], [0, 5, 19, 2]])
    table = emb.weight.detach().clone()
    table[[3, 5]] = holder.rows("default")[1].detach()
    want = torch.nn.functional.embedding(x, table) * (2.5 if kind == "scaled" else 1.0)
    out = holder(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.sum().backward()
    grad = holder.rows("default")[1].grad
    # the padding row gets no gradient (F.embedding's rule, as in PEFT); the others count their uses
    assert grad[0].abs().sum() == (0 if kind == "padding" else 2 * (2.5 if kind == "scaled" else 1.0) * 4)


def test_safe_merge_refuses_nan_rows():
    _, ours, _ = _pair(tiny_llama, [3, 7, 11])
    before = ours.model.embed_tokens.base_layer.weight.detach().clone()
    with torch.no_grad():
        ours.model.embed_tokens.rows("default")[1][1, 0] = float("inf")
    with pytest.raises(ValueError, match="embedding rows"):
        lf.merge(ours, safe=True)
    assert lf.merged_adapters(ours) == []
    assert torch.equal(ours.model.embed_tokens.base_layer.weight, before)
