"""Layer wrappers pinned against PEFT on the same weights: forward, merge, gradients, zero init."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loraforge as lf
from loraforge.layers import LoraConv2d, LoraEmbedding, LoraLinear

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")


class Net(nn.Module):
    """One layer of each supported type, so one config can target each."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 24)
        self.c1d = Conv1D(12, 24)  # GPT-2 layout: weight (in=24, out=12)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(6, 4, kernel_size=1)

    def forward(self, ids, img):
        h = self.c1d(self.lin(self.emb(ids)))
        return h, self.conv1(self.conv(img))


TARGETS = ["emb", "lin", "c1d", "conv", "conv1"]


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 50, (2, 5), generator=g), torch.randn(2, 3, 8, 8, generator=g)


def _pair(r=4, alpha=8, rslora=False):
    torch.manual_seed(0)
    base = Net().eval()
    ours = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=r, alpha=alpha, target_modules=TARGETS, use_rslora=rslora)
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora)
    ).eval()
    # Same random factors on both sides (PEFT's live names carry a `base_model.model.` prefix).
    g = torch.Generator().manual_seed(5)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                ours_params[name.removeprefix("base_model.model.")].copy_(p)
    return base, ours, theirs


def test_wrapper_types_and_base_layer():
    _, ours, _ = _pair()
    assert isinstance(ours.emb, LoraEmbedding) and isinstance(ours.lin, LoraLinear)
    assert isinstance(ours.c1d, LoraLinear) and ours.c1d.fan_in_fan_out
    assert isinstance(ours.conv, LoraConv2d)
    assert type(ours.lin.base_layer) is nn.Linear
    assert ours.c1d.lora_A["default"].weight.shape == (4, 24)  # (r, in) even though Conv1D stores (in, out)
    assert ours.c1d.lora_B["default"].weight.shape == (12, 4)
    assert ours.emb.lora_embedding_A["default"].shape == (4, 50)
    assert ours.emb.lora_embedding_B["default"].shape == (16, 4)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft(rslora):
    base, ours, theirs = _pair(rslora=rslora)
    ids, img = _inputs()
    with torch.no_grad():
        (h1, c1), (h2, c2), (h0, _) = ours(ids, img), theirs(ids, img), base(ids, img)
    torch.testing.assert_close(h1, h2, rtol=0, atol=1e-5)
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-5)
    assert (h1 - h0).abs().max() > 1e-2  # the adapter does something


def test_merge_equals_unmerged_and_peft_merge():
    _, ours, theirs = _pair()
    ids, img = _inputs()
    with torch.no_grad():
        before = ours(ids, img)
        lf.merge(ours)
        merged = ours(ids, img)
        lf.merge(ours)  # idempotent: a second merge changes nothing
        again = ours(ids, img)
    for a, b, c in zip(before, merged, again):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    theirs.merge_adapter()
    for name in TARGETS:
        ours_w = getattr(ours, name).base_layer.weight
        theirs_w = getattr(theirs.base_model.model, name).base_layer.weight
        torch.testing.assert_close(ours_w, theirs_w, rtol=0, atol=1e-6)


def test_zero_init_is_base_and_gradients_only_on_adapters():
    torch.manual_seed(0)
    base = Net().eval()
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    ids, img = _inputs()
    with torch.no_grad():
        for a, b in zip(ours(ids, img), base(ids, img)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours.train()
    h, c = ours(ids, img)
    (h.square().mean() + c.square().mean()).backward()
    for name, p in ours.named_parameters():
        is_lora = "lora_" in name
        assert p.requires_grad == is_lora, name
        if not is_lora:
            assert p.grad is None, name
    # B = 0 at init, so A gets no gradient yet; B does.
    assert ours.lin.lora_B["default"].weight.grad.abs().sum() > 0


def test_linear_gradients_equal_peft():
    _, ours, theirs = _pair()
    ids, img = _inputs()
    for m in (ours, theirs):
        m.train()
        h, c = m(ids, img)
        (h.square().mean() + c.sum()).backward()
    theirs_grads = {
        n.removeprefix("base_model.model."): p.grad
        for n, p in theirs.named_parameters()
        if p.grad is not None
    }
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(theirs_grads) == set(ours_grads)
    for n in ours_grads:
        torch.testing.assert_close(ours_grads[n], theirs_grads[n], rtol=1e-5, atol=1e-6)


def test_dropout_applies_only_in_training():
    torch.manual_seed(0)
    net = lf.inject(Net(), lf.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["lin"]))
    nn.init.normal_(net.lin.lora_B["default"].weight)
    ids, img = _inputs()
    net.eval()
    a, b = net(ids, img)[0], net(ids, img)[0]
    torch.testing.assert_close(a, b)
    net.train()
    assert not torch.allclose(net(ids, img)[0], net(ids, img)[0])


def test_gaussian_and_pissa_init():
    torch.manual_seed(0)
    net = lf.inject(Net(), lf.LoraConfig(r=4, alpha=8, init="gaussian", target_modules=["lin"]))
    a = net.lin.lora_A["default"].weight
    assert abs(a.std().item() - 1 / 4) < 0.05 and net.lin.lora_B["default"].weight.abs().sum() == 0

    torch.manual_seed(0)
    base = Net().eval()
    ids, img = _inputs()
    for cfg_init in ("pissa",):
        net = lf.inject(
            copy.deepcopy(base),
            lf.LoraConfig(r=4, alpha=8, init=cfg_init, target_modules=["lin", "c1d", "emb"]),
        )
        # PiSSA moves the top-r part of W into B·A: outputs are unchanged at the start...
        with torch.no_grad():
            torch.testing.assert_close(net(ids, img)[0], base(ids, img)[0], rtol=0, atol=1e-4)
        # ...and s·B·A is the best rank-r approximation of the original weight.
        w = base.lin.weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close(net.lin.delta_weight("default"), best, rtol=0, atol=1e-4)


def test_pissa_matches_peft():
    torch.manual_seed(0)
    base = Net().eval()
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, init="pissa", target_modules=["lin"]))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["lin"]),
    )
    t = theirs.base_model.model.lin
    # Singular vectors are defined up to sign; the products are not.
    torch.testing.assert_close(
        ours.lin.delta_weight("default"), t.get_delta_weight("default"), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(ours.lin.base_layer.weight, t.base_layer.weight, rtol=0, atol=1e-5)


def test_unsupported_layer_type_is_clear():
    net = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="LayerNorm"):
        lf.inject(net, lf.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_fused_linear_equals_plain_autograd(monkeypatch, arch, bias):
    """The fused base+LoRA function (on by default) gives the plain path's loss and gradients."""
    from conftest import randomize_lora, tiny_gpt2, tiny_llama

    import loraforge.layers.linear as layers

    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(layers, "FUSED", fused)
        m = lf.inject(
            copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", bias=bias)
        )
        randomize_lora(m)
        m.train()
        calls = []

        def counted(*a, calls=calls, apply=layers._FusedLoraLinear.apply):
            calls.append(1)
            return apply(*a)

        monkeypatch.setattr(layers._FusedLoraLinear, "apply", counted)
        torch.manual_seed(0)  # GPT-2 has dropout in its base layers: same masks on both paths
        loss = m(ids, labels=ids).loss
        loss.backward()
        assert bool(calls) == fused
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    assert set(g1) == set(g2) and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["input", "adapter"])
def test_half_precision_base_compute_modes(mode):
    """A bf16 base gets fp32 factors. ``input`` (default) runs the branch in bf16 with the
    factors cast to it; ``adapter`` casts the activation to fp32 (PEFT's default). Either way the
    factors' gradients are fp32."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24, dtype=torch.bfloat16))
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["0"]))
    layer = model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32 and layer.compute == "input"
    with torch.no_grad():
        b.normal_()
    lf.set_compute(model, mode)
    x = torch.randn(5, 32).to(torch.bfloat16)
    y = model(x)
    with torch.no_grad():
        if mode == "input":  # one addmm: s on the (tokens x r) side, the sum inside the product
            low = F.linear(x, a.to(torch.bfloat16)) * 2.0
            want = torch.addmm(layer.base_layer(x), low, b.to(torch.bfloat16).t())
        else:
            want = layer.base_layer(x) + (F.linear(F.linear(x.float(), a), b) * 2.0).to(torch.bfloat16)
        assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().square().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="set_compute"):
        lf.set_compute(model, "fp8")


@pytest.mark.parametrize("mode", ["input", "adapter"])
def test_half_precision_mixed_batch_follows_the_compute_mode(mode):
    """A mixed-adapter batch on a bf16 base runs its low-rank products in the same dtype as
    one adapter at a time, and agrees with it row by row (up to bf16 rounding)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24, dtype=torch.bfloat16))
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["0"]), adapter="a")
    lf.add_adapter(model, "b", lf.LoraConfig(r=2, alpha=4, target_modules=["0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lf.set_compute(model, mode)
    x = torch.randn(3, 7, 32).to(torch.bfloat16)
    rows = ["a", "b", "__base__"]
    with torch.no_grad(), lf.adapter_batch(model, rows):
        mixed = model(x)
    with torch.no_grad():
        singles = []
        for i, name in enumerate(rows):
            if name == "__base__":
                singles.append(model[0].base_layer(x[i : i + 1]))
            else:
                lf.set_adapter(model, name)
                singles.append(model(x[i : i + 1]))
    want = torch.cat(singles)
    assert mixed.dtype == torch.bfloat16
    assert float((mixed.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_unfused_sum_leaves_a_hooked_base_output_alone():
    """The unfused path adds the low-rank product into the base's output in place where the layer
    owns that output, but not where a forward hook may keep it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    lf.inject(model, lf.LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=["0"]))  # unfused
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()
    model.eval()
    x = torch.randn(2, 5, 16)
    seen = []
    handle = model[0].base_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    out = model(x)
    handle.remove()
    base = model[0].base_layer(x)
    torch.testing.assert_close(seen[0].reshape(base.shape), base)  # not modified in place
    torch.testing.assert_close(model(x), out)
