"""LoRA options pinned against PEFT: ``lora_bias`` (B with a bias), ``merge(safe=True)``,
``init=False`` (random A and B, PEFT's values under one seed) and ``init="olora"``."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_pin import close, pin
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraforge as lf
from loraforge.adapter_files import _live_tensors
from loraforge.adapters import set_token_plan
from loraforge.layers import linear as linear_mod
from loraforge.layers.tokens import TokenPlan

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")


class Net(nn.Module):
    """Embedding -> Linear -> GPT-2 Conv1D -> Linear (no bias); and a Conv2d on an image."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.lin = nn.Linear(12, 20)
        self.c1d = Conv1D(16, 20)  # (in=20, out=16), stored (in x out)
        self.nobias = nn.Linear(16, 6, bias=False)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, ids, img):
        h = self.nobias(torch.tanh(self.c1d(self.lin(self.emb(ids)))))
        return h.sum(-1) + self.conv(img).mean((1, 2, 3))[:, None]

    @staticmethod
    def inputs():
        g = torch.Generator().manual_seed(4)
        return torch.randint(0, 40, (2, 7), generator=g), torch.randn(2, 3, 6, 6, generator=g)


def _base() -> Net:
    torch.manual_seed(0)
    return Net().eval()


# -- lora_bias ---------------------------------------------------------------------------------
def test_lora_bias_pinned_against_peft(tmp_path):
    base = _base()
    cfg = {"target_modules": ["lin", "c1d", "conv"], "lora_bias": True, "r": 4, "lora_alpha": 12}
    ours, _ = pin(base, cfg, base.inputs(), tmp_path)
    assert ours.lin.lora_B["default"].bias.shape == (20,) and ours.c1d.lora_B["default"].bias.shape == (16,)
    assert ours.conv.lora_B["default"].bias.shape == (5,)


def test_lora_bias_starts_at_zero_and_merges_into_the_base_bias():
    base = _base()
    net = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, lora_bias=True, target_modules=["lin"]))
    bias = net.lin.lora_B["default"].bias
    assert torch.equal(bias, torch.zeros(20)) and bias.requires_grad
    with torch.no_grad():
        bias.copy_(torch.linspace(-1, 1, 20))
    lf.merge(net)
    expected = base.lin.bias + net.lin.scaling["default"] * bias
    torch.testing.assert_close(net.lin.base_layer.bias, expected, rtol=0, atol=1e-7)
    lf.unmerge(net)
    assert torch.equal(net.lin.base_layer.bias, base.lin.bias)  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bias_takes_the_unfused_path_with_the_bias(dtype):
    base = _base().to(dtype)
    net = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=2, init=False, lora_bias=True, target_modules=["lin"])
    )
    x = torch.randn(3, 12, dtype=dtype)
    assert net.lin._fusable(x) is None  # (the fused function has no bias for B)
    layer = net.lin
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"]
    with torch.no_grad():
        want = base.lin(x).float() + layer.scaling["default"] * b(x.float() @ a.float().T)
        torch.testing.assert_close(
            layer(x).float(), want, rtol=0, atol=5e-2 if dtype == torch.bfloat16 else 1e-5
        )


def test_lora_bias_on_embedding_refused_untouched():
    net = _base()
    with pytest.raises(ValueError, match="target 'emb': lora_bias is not supported on nn.Embedding"):
        lf.inject(net, lf.LoraConfig(lora_bias=True, target_modules=["lin", "emb"]))
    assert type(net.lin) is nn.Linear


def test_lora_bias_merge_into_a_layer_without_bias_refused_untouched():
    net = lf.inject(_base(), lf.LoraConfig(r=2, init=False, lora_bias=True, target_modules=["lin", "nobias"]))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"cannot merge into a Linear without a bias \(adapters \['default'\]\)"
    ):
        lf.merge(net)
    assert lf.merged_adapters(net) == []  # not even 'lin', which comes first
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_lora_bias_mixed_batch_and_per_token_rows():
    net = _base()
    lf.inject(net, lf.LoraConfig(r=2, init=False, lora_bias=True, target_modules=["lin", "c1d"]))
    lf.add_adapter(net, "plain", lf.LoraConfig(r=3, init=False, target_modules=["lin"]))
    with torch.no_grad():
        for p in (net.lin.lora_B["default"].bias, net.c1d.lora_B["default"].bias):
            p.normal_()
    ids, img = net.inputs()
    rows = ["plain", "default"]
    with torch.no_grad():
        with lf.adapter_batch(net, rows):
            mixed = net(ids, img)
        alone = []
        for i, name in enumerate(rows):
            lf.set_adapter(net, name)
            alone.append(net(ids, img)[i])
        torch.testing.assert_close(mixed, torch.stack(alone), rtol=0, atol=1e-5)
        # a serving step: each token its adapter (LoraLinear falls back to the general path)
        tokens = ids[:1]
        names = ["default", None, "plain", "default", "default", "plain", None]
        plan = TokenPlan()
        set_token_plan(net, plan)
        plan.set(names, ["default", "plain"])
        got = net.lin(net.emb(tokens))
        plan.clear()
        for t, name in enumerate(names):
            if name is None:
                with lf.disable_adapters(net):
                    want = net.lin(net.emb(tokens[:, t]))
            else:
                lf.set_adapter(net, name)
                want = net.lin(net.emb(tokens[:, t]))
            torch.testing.assert_close(got[:, t], want, rtol=0, atol=1e-5)


# -- safe merge --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "where, value, dtype, what",
    [
        ("lin.lora_B.default.weight", float("nan"), torch.float32, "weight of 'lin'"),
        ("c1d.lora_A.default.weight", float("inf"), torch.float32, "weight of 'c1d'"),
        ("emb.lora_embedding_B.default", float("nan"), torch.float32, "weight of 'emb'"),
        ("conv.lora_B.default.bias", float("nan"), torch.float32, "bias of 'conv'"),
        ("lin.lora_B.default.weight", 1e5, torch.float16, "weight of 'lin'"),  # finite, overflows fp16
    ],
)
def test_safe_merge_refuses_nonfinite_untouched(where, value, dtype, what):
    net = _base().to(dtype)
    lf.inject(net, lf.LoraConfig(r=2, init=False, target_modules=["lin", "c1d", "emb"]))
    lf.add_adapter(net, "biased", lf.LoraConfig(r=2, init=False, lora_bias=True, target_modules=["conv"]))
    adapter = "biased" if where.startswith("conv") else "default"
    where = where.replace("default", adapter)
    with torch.no_grad():
        dict(net.named_parameters())[where].view(-1)[0] = value
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for merge in (lf.merge, lf.merge_and_unload):
        with pytest.raises(ValueError, match=rf"adapter '{adapter}' would put NaN/Inf into the {what}"):
            merge(net, ["default", "biased"], safe=True)
        assert lf.merged_adapters(net) == []
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    lf.merge(net, ["default", "biased"])  # unsafe: merges, as PEFT's safe_merge=False does
    assert lf.merged_adapters(net) == ["default", "biased"]


def test_safe_merge_of_finite_adapters_equals_merge():
    net = lf.inject(_base(), lf.LoraConfig(r=2, init=False, target_modules=["lin", "c1d", "emb", "conv"]))
    ids, img = net.inputs()
    with torch.no_grad():
        unmerged = net(ids, img)
        lf.merge(net, safe=True)
        torch.testing.assert_close(net(ids, img), unmerged, rtol=0, atol=1e-5)


# -- init=False ------------------------------------------------------------------------------
def test_init_false_draws_peft_values_under_one_seed():
    base = _base()
    targets = ["emb", "lin", "c1d", "conv"]
    for lora_bias in (False, True):
        targets_here = targets[1:] if lora_bias else targets
        torch.manual_seed(7)
        theirs = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=3, init_lora_weights=False, target_modules=targets_here, lora_bias=lora_bias),
        )
        torch.manual_seed(7)
        ours = lf.inject(
            copy.deepcopy(base),
            lf.LoraConfig(r=3, init=False, target_modules=targets_here, lora_bias=lora_bias),
        )
        want = peft.get_peft_model_state_dict(theirs)
        got = {k: v.detach() for k, v in _live_tensors(ours, "default").items()}
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert got["base_model.model.lin.lora_B.weight"].abs().max() <= 1 / 3**0.5  # U(±1/√r)
        if not lora_bias:
            assert abs(float(got["base_model.model.emb.lora_embedding_A"].std()) - 1) < 0.3  # N(0, 1)


# -- init="olora" -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rslora, dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)]
)
def test_olora_equals_peft(rslora, dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8)).to(dtype).eval()
    kw = dict(r=4, target_modules=["0", "2"], use_rslora=rslora)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(lora_alpha=6, init_lora_weights="olora", **kw)
    )
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(alpha=6, init="olora", **kw))
    # (PEFT rounds its factors to the bf16 base's dtype after the init; loraforge keeps them fp32)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for i in ("0", "2"):
        mine, peft_layer = ours.get_submodule(i), theirs.base_model.model.get_submodule(i)
        for attr in ("lora_A", "lora_B"):
            close(
                getattr(mine, attr)["default"].weight.float(),
                peft_layer.__getattr__(attr)["default"].weight.float(),
                tol,
            )
        # the residual W - s·Q_r·R_r, rounded once to the weight's dtype
        torch.testing.assert_close(
            mine.base_layer.weight, peft_layer.base_layer.weight, rtol=0, atol=tol or 8e-3
        )
    x = torch.randn(5, 12, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-2)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-2)


def test_olora_on_gpt2_conv1d_factors_the_out_by_in_matrix():
    # (PEFT's olora_init factors the stored (in x out) matrix; loraforge the (out x in) map W = Q·R)
    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(6, 10)).eval()
    net = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=3, alpha=5, init="olora", target_modules=["0"]))
    q, r = torch.linalg.qr(base[0].weight.T)
    layer = net[0]
    torch.testing.assert_close(layer.lora_A["default"].weight, r[:3], rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight, q[:, :3], rtol=0, atol=0)
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(net(x), base(x), rtol=0, atol=1e-5)


def test_olora_on_embedding_is_peft_default_init():
    base = _base()
    net = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, init="olora", target_modules=["emb"]))
    assert torch.equal(net.emb.lora_embedding_A["default"], torch.zeros(2, 40))
    assert torch.equal(net.emb.base_layer.weight, base.emb.weight)


def test_olora_files_both_ways(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8)).eval()
    cfg = dict(r=4, lora_alpha=8, target_modules=["0", "2"])
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights="olora", **cfg)
    ).eval()
    with torch.no_grad():  # trained factors
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = theirs(x)
        close(ours(x), expected)
    lf.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        close(back(x), expected)


def test_olora_load_failure_puts_the_base_weights_back(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8)).eval()
    src = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, init="olora", target_modules=["0", "2"]))
    lf.save_adapter(src, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # finite in the file (fp64) but overflowing the fp32 factor it lands in: found while copying
    # in, after the OLoRA init moved the base weights
    key = "base_model.model.2.lora_B.weight"
    tensors[key] = torch.full_like(tensors[key], 1e300, dtype=torch.float64)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    target = copy.deepcopy(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="overflows"):
        lf.load_adapter(target, tmp_path)
    assert type(target[0]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_olora_refused_on_a_4bit_base():
    net = nn.Sequential(lf.Linear4bit.from_linear(nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="init='olora' needs a full-precision base layer"):
        lf.inject(net, lf.LoraConfig(r=2, init="olora", target_modules=["0"]))


def test_fused_switch_does_not_change_lora_bias(monkeypatch):
    base = _base()
    net = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=2, init=False, lora_bias=True, target_modules=["lin"])
    )
    x = torch.randn(3, 12)
    with torch.no_grad():
        fused_on = net.lin(x)
        monkeypatch.setattr(linear_mod, "FUSED", False)
        torch.testing.assert_close(net.lin(x), fused_on, rtol=0, atol=0)


@pytest.mark.parametrize(
    "model, targets, kw, why",
    [
        (_base, ["lin"], {"lora_bias": True}, "lora_bias adapters"),
        (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), ["0"], {}, "adapters on a grouped Conv2d"),
        (lambda: nn.Sequential(nn.MultiheadAttention(8, 2)), ["0"], {}, "adapters on nn.MultiheadAttention"),
    ],
)
def test_add_weighted_adapter_refuses_what_it_cannot_combine(model, targets, kw, why):
    net = lf.inject(model(), lf.LoraConfig(r=2, target_modules=targets, **kw))
    lf.add_adapter(net, "b", lf.LoraConfig(r=2, target_modules=targets))
    with pytest.raises(ValueError, match=f"add_weighted_adapter cannot combine {why}"):
        lf.add_weighted_adapter(net, ["default", "b"], [0.5, 0.5], "mix", combination="cat")
    assert lf.list_adapters(net) == ["default", "b"]


def test_lora_bias_on_a_4bit_base_merges_into_its_bias():
    torch.manual_seed(0)
    qc = lf.QuantConfig(compute_dtype=torch.float32)
    net = nn.Sequential(lf.Linear4bit.from_linear(nn.Linear(32, 16), qc))
    lf.inject(net, lf.LoraConfig(r=2, init=False, lora_bias=True, target_modules=["0"]))
    with torch.no_grad():
        net[0].lora_B["default"].bias.normal_()
        x = torch.randn(3, 32)
        unmerged = net(x)
        plain = lf.merge_and_unload(net, dequantize=True, safe=True)
        assert type(plain[0]) is nn.Linear
        torch.testing.assert_close(plain(x), unmerged, rtol=0, atol=1e-5)
