"""``Linear4bit`` and ``lf.quantize``: forward/backward, memory, state dict (bitsandbytes keys), errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import loraforge as lf
from loraforge.quant import Linear4bit, QuantConfig

QC32 = QuantConfig(compute_dtype=torch.float32)


def make(in_f=96, out_f=40, bias=True, qc=QC32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin, Linear4bit.from_linear(lin, qc)


def test_contract_attributes():
    lin, q = make()
    assert (q.in_features, q.out_features) == (96, 40)
    assert isinstance(q.weight, nn.Parameter) and not q.weight.requires_grad
    assert q.weight.dtype == torch.uint8 and q.weight.shape == ((96 * 40 + 1) // 2, 1)
    assert isinstance(q.bias, nn.Parameter) and q.bias.is_floating_point()
    assert q.compute_dtype == torch.float32 and q.quant_state.shape == (40, 96)
    assert q.dequantize().shape == (40, 96) and q.dequantize().dtype == torch.float32
    assert (q.dequantize() - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_dequantizes_to_compute_dtype(compute_dtype):
    lin, q = make(qc=QuantConfig(compute_dtype=compute_dtype))
    x = torch.randn(3, 5, 96)
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (3, 5, 40)
    xc = x.to(compute_dtype)
    want = xc @ q.dequantize(compute_dtype).t() + q.bias.to(compute_dtype)
    assert torch.equal(y, want.to(x.dtype))


def test_backward_gives_input_grad_only():
    lin, q = make()
    x = torch.randn(4, 96, requires_grad=True)
    q(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    nn.functional.linear(x_ref, q.dequantize(), q.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert q.weight.grad is None


def test_large_weights_reuse_one_buffer_and_give_the_same_results(monkeypatch):
    """Weights of 32 MiB and more dequantize into a per-thread buffer (forced here for small ones):
    two layers of one size share it, and outputs and input gradients equal the fresh path."""
    from loraforge.quant import linear4bit as L

    layers = [make(seed=k)[1] for k in range(2)]
    x = torch.randn(4, 96)

    def run():
        xs = [x.clone().requires_grad_() for _ in layers]
        ys = [q(xi) for q, xi in zip(layers, xs)]
        sum(y.pow(2).sum() for y in ys).backward()
        return [y.detach() for y in ys], [xi.grad for xi in xs]

    fresh = run()
    L.release_buffers()
    monkeypatch.setattr(L, "_REUSE_BYTES", 0)
    reused = run()
    buffers = L._buffers.by_size
    assert list(buffers) == [(40 * 96, torch.float32)]  # one buffer, shared by both layers
    for a, b in zip(fresh[0] + fresh[1], reused[0] + reused[1]):
        assert torch.equal(a, b)
    assert not torch.equal(fresh[0][0], fresh[0][1])  # (the two layers do differ)
    L.release_buffers()
    assert L._buffers.by_size == {}


def test_autograd_keeps_only_the_packed_weight():
    """Memory test: record every tensor autograd saves for backward during the forward pass."""
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024, bias=False)
    q = Linear4bit.from_linear(lin, QuantConfig(compute_dtype=torch.bfloat16))
    x = torch.randn(2, 1024, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    dense_bytes = 1024 * 1024 * 2  # what keeping a dequantized bf16 copy would cost
    print(f"\nsaved for backward: {[(tuple(t.shape), t.dtype) for t in saved]} = {saved_bytes} bytes "
          f"(a dequantized bf16 weight would be {dense_bytes})")  # fmt: skip
    assert any(t is q.weight or t.data_ptr() == q.weight.data_ptr() for t in saved)
    assert not any(t.is_floating_point() and t.numel() >= 1024 * 1024 for t in saved)
    assert saved_bytes <= q.weight.numel() + 64  # the 0.5 MB packed weight, nothing else of size
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape

    # The same check for the bare nn.Linear shows what the hook sees when a weight-sized tensor is kept
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.functional.linear(x, q.dequantize(torch.float32))
    assert any(t.numel() == 1024 * 1024 for t in saved)


def test_state_dict_keys_and_roundtrip():
    lin, q = make()
    sd = q.state_dict()
    assert list(sd) == [
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
    ]  # fmt: skip
    assert json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].numpy()))["shape"] == [40, 96]
    fresh = Linear4bit(96, 40, bias=True, quant_config=QC32)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), q(x))
    # a full-precision nn.Linear state dict is quantized on load
    from_fp = Linear4bit(96, 40, bias=True, quant_config=QC32)
    from_fp.load_state_dict(lin.state_dict())
    assert torch.equal(from_fp.weight, q.weight)


def test_state_dict_equals_bitsandbytes_linear4bit(bnb):
    import bitsandbytes as bnb_lib

    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            torch.manual_seed(1)
            lin = nn.Linear(128, 48)
            ours = Linear4bit.from_linear(lin, QuantConfig(quant_type, 64, double_quant, torch.float32))
            theirs = bnb_lib.nn.Linear4bit(
                128, 48, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type
            )
            theirs.load_state_dict(lin.state_dict())
            theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move to a device
            a, b = ours.state_dict(), theirs.state_dict()
            assert list(a) == list(b)
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (quant_type, double_quant, k)
            # and bitsandbytes' forward (train mode: its plain dequantize-then-matmul path) agrees
            theirs.train()
            x = torch.randn(3, 128, requires_grad=True)
            assert torch.equal(ours(x), theirs(x))


def test_load_errors_name_the_tensor():
    _, q = make()
    sd = q.state_dict()
    fresh = Linear4bit(96, 40, bias=True, quant_config=QC32)
    bad = dict(sd)
    bad.pop("weight.absmax")
    with pytest.raises(RuntimeError, match=r"weight\.absmax: missing"):
        fresh.load_state_dict(bad)
    bad = {k: v for k, v in sd.items() if not k.startswith("weight.")}
    with pytest.raises(RuntimeError, match=r"weight: packed torch.uint8 weight without its quant state"):
        fresh.load_state_dict(bad)
    bad = dict(sd, weight=sd["weight"][:-3])
    with pytest.raises(RuntimeError, match=r"weight: 1917 packed bytes"):
        fresh.load_state_dict(bad)
    wrong_shape = Linear4bit(40, 96, bias=False, quant_config=QC32)
    with pytest.raises(RuntimeError, match=r"weight: quant state shape \[40, 96\], layer is \[96, 40\]"):
        wrong_shape.load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="no quantized weight"):
        Linear4bit(8, 8)(torch.randn(1, 8))
    with pytest.raises(TypeError, match="non-floating"):
        Linear4bit(8, 8).quantize_weight_(torch.zeros(8, 8, dtype=torch.int32))


def test_requantize_reports_rounding_error():
    lin, q = make()
    delta = torch.randn(40, 96) * 0.01
    target = q.dequantize() + delta
    err = q.requantize_(target)
    assert err == pytest.approx((target - q.dequantize()).abs().mean().item(), rel=1e-6)
    assert 0 < err < 0.05 and q.quant_state.dtype == torch.float32


def test_to_moves_state_but_never_casts_it():
    _, q = make()
    before = q.quant_state.nested and q.quant_state.state2.absmax.clone()
    q.half()
    assert q.weight.dtype == torch.uint8 and q.bias.dtype == torch.float16
    assert q.quant_state.state2.absmax.dtype == torch.float32 and torch.equal(
        q.quant_state.state2.absmax, before
    )
    assert copy.deepcopy(q).dequantize().equal(q.dequantize())


def test_quantize_model_skips_modules_like_peft_names():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)))
    model.add_module("lm_head", nn.Linear(64, 10))
    model.body.add_module("lm_head", nn.Linear(64, 64))  # "lm_head" also matches "body.lm_head"
    out = lf.quantize(model, QuantConfig(compute_dtype=torch.float32))
    assert out is model
    assert isinstance(model.body[0], Linear4bit) and isinstance(model.body[2], Linear4bit)
    assert type(model.lm_head) is nn.Linear and type(model.body.lm_head) is nn.Linear
    lf.quantize(model, QuantConfig(skip_modules=[]))
    assert isinstance(model.lm_head, Linear4bit)


def test_lora_merge_dequantize_gives_full_precision_model():
    """Issue item 5: merge_and_unload(dequantize=True) = dequantized base + s*B@A, as full precision."""
    from .util import tiny_llama

    model = lf.quantize(tiny_llama().float(), QuantConfig(compute_dtype=torch.float32))
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    merged = lf.merge_and_unload(copy.deepcopy(model), dequantize=True)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        got = merged(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    # an fp32 model computing in bf16: the unloaded layers are fp32 like the rest of it
    half = lf.quantize(tiny_llama().float(), QuantConfig(compute_dtype=torch.bfloat16))
    lf.inject(half, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        want_half = half(ids).logits
        plain = lf.merge_and_unload(half, dequantize=True)
        assert plain.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
        got_half = plain(ids).logits
    assert float((got_half - want_half).norm() / want_half.norm()) < 2e-2  # bf16 vs fp32 compute
    # requantized merge: stays 4-bit, reports its rounding error
    with pytest.warns(UserWarning, match="requantization changed weights by"):
        requant = lf.merge_and_unload(model, dequantize=False)
    assert isinstance(requant.model.layers[0].self_attn.q_proj, Linear4bit)
