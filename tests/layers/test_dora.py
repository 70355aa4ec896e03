"""DoRA (``LoraConfig(use_dora=True)``) pinned against PEFT 0.21 on the same weights: magnitude
init, forward, gradients of A, B and m, dropout in training, merged weights, exact unmerge, files
both ways; on Linear, GPT-2 Conv1D, Conv2d, Embedding and the 4-bit base; mixed batches and the
serving token path against the plain per-adapter forward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraforge as lf
from loraforge.adapters import set_token_plan
from loraforge.layers import linear as linear_mod
from loraforge.layers.tokens import TokenPlan

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

PREFIX = "base_model.model."


class Net(nn.Module):
    """One layer of each DoRA base type (and a 1x1 conv)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 24)
        self.c1d = Conv1D(12, 24)  # GPT-2 layout: weight (in=24, out=12)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(6, 4, kernel_size=1)

    def forward(self, ids, img):
        return self.c1d(self.lin(self.emb(ids))), self.conv1(self.conv(img))


TARGETS = ["emb", "lin", "c1d", "conv", "conv1"]


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 50, (2, 5), generator=g), torch.randn(2, 3, 8, 8, generator=g)


def _randomize(model, seed=5, prefix=""):
    """Random factors and magnitudes moved off their init (so that f ≠ 1), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _copy_into_peft(ours, theirs):
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(mine[name.removeprefix(PREFIX)])


def _pair(dropout=0.0, targets=TARGETS):
    torch.manual_seed(0)
    base = Net().eval()
    cfg = lf.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets, use_dora=True)
    ours = lf.inject(copy.deepcopy(base), cfg)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    return base, ours, theirs


def _grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_magnitude_names_shapes_and_init_equal_peft():
    base, ours, theirs = _pair()
    ids, img = _inputs()
    theirs_lora = {n.removeprefix(PREFIX): p for n, p in theirs.named_parameters() if "lora_" in n}
    ours_lora = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert set(ours_lora) == set(theirs_lora)
    assert ours.lin.lora_magnitude_vector["default"].weight.shape == (24,)
    assert ours.c1d.lora_magnitude_vector["default"].weight.shape == (12,)
    assert ours.emb.lora_magnitude_vector["default"].weight.shape == (16,)
    assert ours.conv.lora_magnitude_vector["default"].weight.shape == (1, 6, 1, 1)
    for n, p in ours_lora.items():
        assert p.requires_grad
        if "magnitude" in n:  # m = ‖W0 + ΔW‖ of the initial factors (ΔW = 0: B = 0, A = 0 for embeddings)
            torch.testing.assert_close(p, theirs_lora[n], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # f = 1 exactly at the start: the base model's output, bit for bit
        for a, b in zip(ours(ids, img), base(ids, img)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [True, False])
def test_forward_and_gradients_equal_peft(monkeypatch, fused):
    monkeypatch.setattr(linear_mod, "FUSED", fused)
    _, ours, theirs = _pair()
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    ids, img = _inputs()
    with torch.no_grad():
        for a, b in zip(ours(ids, img), theirs(ids, img)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for m in (ours, theirs):
        m.train()
        h, c = m(ids, img)
        (h.square().mean() + c.sin().sum()).backward()
    g_ours, g_theirs = _grads(ours), _grads(theirs, PREFIX)
    assert set(g_ours) == set(g_theirs) and any("magnitude" in n for n in g_ours)
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-5, msg=n)


def test_dropout_in_training_equals_peft():
    # PEFT runs the base again on the dropped-out input; with the same seed both draw the same masks
    _, ours, theirs = _pair(dropout=0.5, targets=["lin", "c1d", "conv"])
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    ids, img = _inputs()
    outs = []
    for m in (ours, theirs):
        m.train()
        torch.manual_seed(11)
        h, c = m(ids, img)
        (h.square().mean() + c.sin().sum()).backward()
        outs.append((h, c))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g_ours, g_theirs = _grads(ours), _grads(theirs, PREFIX)
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_peft_and_unmerge_is_exact(dtype):
    base, ours, theirs = _pair()
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    ours.to(dtype)
    theirs.to(dtype)
    ids, img = _inputs()
    img = img.to(dtype)
    w0 = {n: getattr(ours, n).base_layer.weight.clone() for n in TARGETS}
    with torch.no_grad():
        before = ours(ids, img)
        lf.merge(ours)
        merged = ours(ids, img)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(before, merged):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    theirs.merge_adapter()
    for n in TARGETS:
        torch.testing.assert_close(
            getattr(ours, n).base_layer.weight,
            getattr(theirs.base_model.model, n).base_layer.weight,
            rtol=tol, atol=1e-6 if dtype == torch.float32 else 2e-2,
        )  # fmt: skip
    lf.unmerge(ours)
    for n in TARGETS:
        assert torch.equal(getattr(ours, n).base_layer.weight, w0[n]), n
    with torch.no_grad():
        for a, b in zip(ours(ids, img), before):
            assert torch.equal(a, b)


def test_dora_and_lora_adapters_together_equal_peft():
    # Both active: PEFT applies them in turn, DoRA rescaling what LoRA added; merging gives the same.
    torch.manual_seed(0)
    base = Net().eval()
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=3, alpha=6, target_modules=TARGETS), adapter="l")
    lf.add_adapter(ours, "d", lf.LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS), adapter_name="l"
    )
    theirs.add_adapter("d", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    lf.set_adapter(ours, ["l", "d"])
    theirs.base_model.set_adapter(["l", "d"])
    theirs.eval()
    ids, img = _inputs()
    with torch.no_grad():
        want = theirs(ids, img)
        for a, b in zip(ours(ids, img), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        w0 = {n: getattr(ours, n).base_layer.weight.clone() for n in TARGETS}
        lf.merge(ours, ["l", "d"])
        for a, b in zip(ours(ids, img), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        theirs.merge_adapter(["l", "d"])
        for n in TARGETS:
            ours_w = getattr(ours, n).base_layer.weight
            torch.testing.assert_close(ours_w, getattr(theirs.base_model.model, n).base_layer.weight)
        lf.unmerge(ours, "d")  # one of two out: the base holds W0 + ΔW_l again, exactly
        lf.unmerge(ours)
    for n in TARGETS:
        assert torch.equal(getattr(ours, n).base_layer.weight, w0[n]), n


def test_unmerge_reports_a_magnitude_changed_while_merged():
    _, ours, _ = _pair(targets=["lin"])
    _randomize(ours)
    w0 = ours.lin.base_layer.weight.clone()
    lf.merge(ours)
    with torch.no_grad():
        ours.lin.lora_magnitude_vector["default"].weight.mul_(2)
    with pytest.warns(UserWarning, match="changed while merged"):
        lf.unmerge(ours)
    assert torch.equal(ours.lin.base_layer.weight, w0)


def _multi(seed=0):
    """Net with DoRA adapters d1, d2 and LoRA adapter l on every layer, random weights."""
    torch.manual_seed(seed)
    model = Net().eval()
    lf.inject(model, lf.LoraConfig(r=2, alpha=4, target_modules=TARGETS, use_dora=True), adapter="d1")
    lf.add_adapter(model, "l", lf.LoraConfig(r=3, alpha=3, target_modules=TARGETS))
    lf.add_adapter(model, "d2", lf.LoraConfig(r=4, alpha=8, target_modules=["lin", "conv"], use_dora=True))
    _randomize(model)
    return model


def test_mixed_batch_with_dora_and_lora_rows():
    model = _multi()
    names = ["d1", "__base__", "l", "d2", "d1"]
    g = torch.Generator().manual_seed(4)
    ids, img = torch.randint(0, 50, (5, 6), generator=g), torch.randn(5, 3, 8, 8, generator=g)
    with torch.no_grad(), lf.adapter_batch(model, names):
        got = model(ids, img)
    want = []
    for i, n in enumerate(names):
        with torch.no_grad():
            if n == "__base__":
                with lf.disable_adapters(model):
                    want.append(model(ids[i : i + 1], img[i : i + 1]))
            else:
                lf.set_adapter(model, n)
                want.append(model(ids[i : i + 1], img[i : i + 1]))
    for k in range(2):
        torch.testing.assert_close(got[k], torch.cat([w[k] for w in want]), rtol=1e-5, atol=1e-5)


def test_mixed_batch_trains_the_magnitudes():
    model = _multi()
    lf.set_adapter(model, ["d1", "l", "d2"])
    ids, img = _inputs()
    with lf.adapter_batch(model, ["d2", "d1"]):
        h, c = model(ids, img)
    (h.sum() + c.sum()).backward()
    assert model.lin.lora_magnitude_vector["d1"].weight.grad.abs().sum() > 0
    assert model.lin.lora_magnitude_vector["d2"].weight.grad.abs().sum() > 0


def test_token_path_gives_each_token_its_dora_adapter():
    model = _multi()
    names = ["d2", None, "d1", "l", "d1", "d1", "d2", "d2", "l", None]
    ids = torch.randint(0, 50, (1, len(names)), generator=torch.Generator().manual_seed(2))
    lin_only = lambda m, x: m.c1d(m.lin(m.emb(x)))  # noqa: E731 (the token path is for sequences)
    plan = TokenPlan()
    set_token_plan(model, plan)
    plan.set(names, ["d1", "l", "d2"], n_decode=4)
    with torch.no_grad():
        got = lin_only(model, ids)
    plan.clear()
    want = []
    for t, n in enumerate(names):
        with torch.no_grad():
            if n is None:
                with lf.disable_adapters(model):
                    want.append(lin_only(model, ids[:, t : t + 1]))
            else:
                lf.set_adapter(model, n)
                want.append(lin_only(model, ids[:, t : t + 1]))
    torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=1e-5, atol=1e-5)


def test_magnitude_trains_and_follows_the_active_adapter():
    model = _multi()
    lf.set_adapter(model, "d1")
    m1, m2 = (model.lin.lora_magnitude_vector[n].weight for n in ("d1", "d2"))
    assert m1.requires_grad and not m2.requires_grad
    start = m1.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, img = _inputs()
    model.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        h, c = model(ids, img)
        loss = h.square().mean() + c.square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and not torch.equal(m1, start)
    lf.set_adapter(model, "d2")
    assert m2.requires_grad and not m1.requires_grad


def test_training_fast_paths_equal_the_plain_forward(monkeypatch):
    # the fused linear function and the patched SwiGLU MLP (training.fast) rescale like the plain path
    from loraforge.training import fast

    torch.manual_seed(0)
    model = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    _randomize(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    grads = []
    for patched in (False, True):
        monkeypatch.setattr(linear_mod, "FUSED", patched)
        m = copy.deepcopy(model).train()
        if patched:  # (each fast MLP is probed against the module's own forward before it is used)
            fast.patch_model(m)
            assert "mlp" in fast.patched_modules(m).values()
        m(ids, labels=ids).loss.backward()
        grads.append(_grads(m))
    assert any("magnitude" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


# -- files ------------------------------------------------------------------------------------------
def _llama_pair():
    base = tiny_llama()
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=True)
    return base, cfg


def test_our_file_loads_in_peft_with_same_logits(tmp_path, ids):
    base, cfg = _llama_pair()
    ours = lf.inject(copy.deepcopy(base), cfg)
    _randomize(ours)
    lf.save_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert tensors[key].shape == (32,) and PREFIX + "model.embed_tokens.lora_magnitude_vector" in tensors
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


def test_peft_file_loads_with_same_logits(tmp_path, ids):
    base, _ = _llama_pair()
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=True
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
    _randomize(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path)
    key = PREFIX + "model.layers.1.mlp.down_proj.lora_magnitude_vector"
    m = load_file(tmp_path / "adapter_model.safetensors")[key]  # the file's magnitudes are the live ones
    assert torch.equal(ours.model.layers[1].mlp.down_proj.lora_magnitude_vector["default"].weight, m)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


def test_dora_file_without_magnitudes_is_refused(tmp_path):
    base, cfg = _llama_pair()
    plain = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lf.save_adapter(plain, tmp_path)
    import json

    cfg_file = tmp_path / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dora": True}))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lora_magnitude_vector.*missing"):
        lf.load_adapter(fresh, tmp_path)
    assert not any("lora_" in n for n, _ in fresh.named_parameters())


# -- the 4-bit base ---------------------------------------------------------------------------------
class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(128, 64)

    def forward(self, x):
        return self.fc(x)


def test_4bit_base_equals_peft_on_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    from loraforge.quant import Linear4bit, QuantConfig

    torch.manual_seed(0)
    fp = Lin()
    ours = Lin()
    ours.fc = Linear4bit.from_linear(fp.fc, QuantConfig("nf4", 64, False, torch.float32))
    theirs = Lin()
    theirs.fc = bnb.nn.Linear4bit(
        128, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False
    )
    theirs.fc.load_state_dict(fp.fc.state_dict())
    theirs.fc = theirs.fc.to("cpu")
    lf.inject(ours, lf.LoraConfig(r=4, alpha=8, target_modules=["fc"], use_dora=True))
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], use_dora=True)
    theirs = peft.get_peft_model(theirs, pcfg)
    m_ours = ours.fc.lora_magnitude_vector["default"].weight
    # m = ‖dequantized W0‖ per row, on both sides
    torch.testing.assert_close(m_ours, theirs.base_model.model.fc.lora_magnitude_vector["default"].weight)
    torch.testing.assert_close(m_ours, ours.fc.base_layer.dequantize(torch.float32).norm(dim=1))
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    for m in (ours, theirs):
        m.train()
        m(x).sin().sum().backward()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    g_ours, g_theirs = _grads(ours), _grads(theirs, PREFIX)
    assert set(g_ours) == set(g_theirs) and len(g_ours) == 3
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-5, msg=n)


def test_4bit_merge_requantizes_and_unmerge_restores_the_packed_weight():
    from loraforge.quant import QuantConfig

    torch.manual_seed(0)
    model = lf.quantize(Lin(), QuantConfig(compute_dtype=torch.float32))
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["fc"], use_dora=True))
    _randomize(model)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    packed = model.fc.base_layer.weight.clone()
    with torch.no_grad():
        want = model(x)
        exact = lf.merge_and_unload(copy.deepcopy(model), dequantize=True)  # full precision: exact
        torch.testing.assert_close(exact(x), want, rtol=1e-5, atol=1e-5)
        with pytest.warns(UserWarning, match="requantization"):
            lf.merge(model)
        err = float((model(x) - want).norm() / want.norm())
        assert 0 < err < 0.25, err  # requantized: NF4 rounding of the merged (rescaled) weight, not exact
        lf.unmerge(model)
        assert torch.equal(model.fc.base_layer.weight, packed)
        assert torch.equal(model(x), want)


def test_method_dora_trains_saves_and_resumes_the_magnitudes(tmp_path):
    # `method: dora` (the lora section with use_dora): m trains, is saved in PEFT's file, and a run
    # stopped half way resumes to the same end as one that ran through
    from training.util import QA_EVAL, tiny_config

    def run(out, steps, **extra):
        train = {"max_steps": steps, "save_every": 3, "batch_size": 8, "lr": 1e-2, "schedule": "constant"}
        return lf.train({**tiny_config(out, method="dora", train=train, data={"eval": QA_EVAL}), **extra})

    model, metrics = run(tmp_path / "a", 6)
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]
    q = model.model.layers[0].self_attn.q_proj
    m = q.lora_magnitude_vector["default"].weight
    assert not torch.allclose(m, q.base_layer.weight.norm(dim=1))  # trained away from ‖W0‖
    saved = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    assert torch.equal(saved[PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector"], m.detach())
    run(tmp_path / "b", 3)
    run(tmp_path / "b", 6, resume="auto")
    resumed = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert set(resumed) == set(saved) and any("magnitude" in k for k in saved)
    for k in saved:
        assert torch.equal(resumed[k], saved[k]), k


def test_weighted_combination_of_dora_adapters_is_refused():
    model = _multi()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="use DoRA"):
        lf.add_weighted_adapter(model, ["d1", "l"], [0.5, 0.5], "mix", combination="cat")
    assert "mix" not in model.lin.r
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_traces_into_one_graph_for_torch_compile():
    # (train.compile compiles the decoder layers on CUDA: the DoRA path must not break the graph)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True))
    _randomize(model)
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    for m in (model.train(), compiled.train()):
        m(x).sin().sum().backward()
    want = _grads(model)
    got = _grads(compiled, "_orig_mod.")
    assert set(got) == set(want) and len(want) == 6
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_pissa_init_then_magnitude_equals_peft():
    # m is taken after the init moved W0's top singular part into B·A: ‖W0_res + ΔW‖ = ‖W0‖
    torch.manual_seed(0)
    base = Net().eval()
    targets = ["lin", "c1d"]
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True, init="pissa")
    ours = lf.inject(copy.deepcopy(base), cfg)
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights="pissa"
    )
    theirs = dict(peft.get_peft_model(copy.deepcopy(base), pcfg).named_parameters())
    for n, p in ours.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, theirs[PREFIX + n], rtol=1e-6, atol=1e-6, msg=n)
    torch.testing.assert_close(ours.lin.lora_magnitude_vector["default"].weight, base.lin.weight.norm(dim=1))


def test_safe_merge_refuses_a_magnitude_that_would_put_inf_in_the_weight():
    _, ours, _ = _pair(targets=["lin", "conv"])
    _randomize(ours)
    with torch.no_grad():
        ours.conv.lora_magnitude_vector["default"].weight[0, 2] = float("inf")
    before = {n: p.clone() for n, p in ours.state_dict().items()}
    with pytest.raises(ValueError, match="NaN/Inf"):
        lf.merge(ours, safe=True)
    assert all(torch.equal(p, before[n]) for n, p in ours.state_dict().items())
    assert not lf.merged_adapters(ours)


def test_lora_bias_with_dora_is_refused_as_in_peft():
    with pytest.raises(ValueError, match="lora_bias is not supported with use_dora"):
        lf.LoraConfig(r=4, target_modules=["lin"], use_dora=True, lora_bias=True)


@pytest.mark.parametrize("mode", ["input", "adapter"])
def test_half_precision_base_follows_the_compute_mode(mode):
    # a bf16 base with fp32 factors and magnitudes: the output in bf16, close to the fp32 model's;
    # gradients reach A, B and m in fp32
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 16))
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True))
    _randomize(model)
    half = copy.deepcopy(model)
    for layer in (half[0], half[2]):
        layer.base_layer.to(torch.bfloat16)
    lf.set_compute(half, mode)
    x = torch.randn(3, 7, 32)
    want = model(x)
    got = half(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).norm() / want.norm()) < 2e-2
    got.float().square().mean().backward()
    m = half[0].lora_magnitude_vector["default"].weight
    assert m.dtype == m.grad.dtype == torch.float32 and m.grad.abs().sum() > 0
    with torch.no_grad():  # and a mixed batch in bf16 agrees with the rows run alone
        lf.add_adapter(half, "plain", lf.LoraConfig(r=2, alpha=4, target_modules=["0", "2"]))
        xb = x.to(torch.bfloat16)
        with lf.adapter_batch(half, ["default", "plain", "__base__"]):
            mixed = half(xb)
        lf.set_adapter(half, "default")
        row0 = half(xb[:1])
    assert float((mixed[:1].float() - row0.float()).norm() / row0.float().norm()) < 1e-2
