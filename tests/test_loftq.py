"""LoftQ (init="loftq"): pinned against peft 0.21's loftq_init, on tiny models and real weights."""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
from conftest import logits, tiny_gpt2, tiny_llama
from torch import nn

import loraforge as lf
from loraforge.loftq import loftq, quantize_roundtrip, relative_errors
from loraforge.quant import QuantConfig, quantize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peft_loftq_cpu():
    """PEFT's own ``loftq_init``, run on CPU. PEFT 0.21 hard-codes ``compute_device = "cuda"``
    (it quantizes with bitsandbytes, whose CPU backend computes the same NF4 / int8): the function's
    source is executed here with that one string changed, nothing else."""
    pytest.importorskip("bitsandbytes")
    utils = pytest.importorskip("peft.utils.loftq_utils")
    source = inspect.getsource(utils.loftq_init)
    assert source.count('"cuda"') == 1  # (the one device string; a newer PEFT may differ)
    source = source.replace('"cuda"', '"cpu"')
    namespace = dict(vars(utils))
    exec(source, namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("bits, iters", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_same_q_and_low_rank_part_as_peft(peft_loftq_cpu, bits, iters):
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(bits + iters)) * 0.05
    q_theirs, a_theirs, b_theirs = peft_loftq_cpu(w, bits, 4, num_iter=iters)
    q, a, b = loftq(w, 4, bits, iters)
    assert torch.equal(q, q_theirs)  # bit for bit: the same quantizer on the same residual
    torch.testing.assert_close(b @ a, b_theirs @ a_theirs, rtol=0, atol=1e-6)
    plain, ours = relative_errors(w, 4, bits, iters)
    assert ours < plain


def test_two_bits_is_refused_clearly():
    with pytest.raises(ValueError, match="4 bits .NF4. or 8 bits"):
        quantize_roundtrip(torch.ones(4, 4), 2)
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="loftq_bits=2"):
        lf.inject(model, lf.LoraConfig(r=2, target_modules=["q_proj"], init="loftq", loftq_bits=2))
    after = model.state_dict()  # refused before the model changed
    assert list(after) == list(before) and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("alpha", [4, 16])
def test_inject_replaces_base_by_q_and_approximates_w(alpha):
    base = tiny_llama()
    model = lf.inject(
        copy.deepcopy(base),
        lf.LoraConfig(r=4, alpha=alpha, target_modules=["q_proj", "down_proj"], init="loftq", loftq_iter=2),
    )
    layer = model.model.layers[0].self_attn.q_proj
    w = base.model.layers[0].self_attn.q_proj.weight
    q = layer.base_layer.weight
    assert torch.equal(q, loftq(w, 4, 4, 2)[0])  # the base now holds the dequantized Q
    err_plain = torch.linalg.norm(w - quantize_roundtrip(w, 4))
    err = torch.linalg.norm(w - (q + layer.delta_weight("default")))  # s = alpha / r is honoured
    assert err < 0.95 * err_plain
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    want = logits(base, ids)
    q_only = copy.deepcopy(model)
    with lf.disable_adapters(q_only):
        gap_q = (logits(q_only, ids) - want).abs().mean()
    assert (logits(model, ids) - want).abs().mean() < gap_q


def test_conv1d_and_embedding_targets():
    base = tiny_gpt2()
    model = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, target_modules=["c_attn", "wte"], init="loftq"))
    for path in ("transformer.h.0.attn.c_attn", "transformer.wte"):
        layer = model.get_submodule(path)
        w = base.get_submodule(path).weight
        stored = layer.base_layer.weight
        assert torch.equal(stored, quantize_roundtrip(w, 4))  # Q in the layout the base stores
        delta = layer.delta_weight("default")
        delta = delta.T if layer.stores_transposed and delta.shape != stored.shape else delta
        assert torch.linalg.norm(w - stored - delta) < torch.linalg.norm(w - stored)


def test_loftq_then_nf4_holds_q_exactly():
    # PEFT's flow: LoftQ on the full-precision model, save the base, load it in 4-bit
    model = lf.inject(tiny_llama(), lf.LoraConfig(r=4, target_modules=["q_proj"], init="loftq"))
    q = model.model.layers[1].self_attn.q_proj.base_layer.weight.detach().clone()
    plain = lf.unload(copy.deepcopy(model))
    quantize(plain, QuantConfig(blocksize=64, double_quant=False, compute_dtype=torch.float32))
    assert torch.equal(plain.model.layers[1].self_attn.q_proj.dequantize(torch.float32), q)


def test_four_bit_base_is_refused_before_any_change():
    model = quantize(tiny_llama(), QuantConfig(compute_dtype=torch.float32))
    with pytest.raises(ValueError, match="already 4-bit"):
        lf.inject(model, lf.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="loftq"))
    assert lf.list_adapters(model) == [] and not any("lora_" in n for n, _ in model.named_parameters())


def test_files_both_ways_with_peft(tmp_path, peft_loftq_cpu, monkeypatch):
    """PEFT reruns LoftQ when it loads a LoftQ adapter (the base becomes Q), as loraforge does."""
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.layer as peft_layer

    monkeypatch.setattr(peft_layer, "loftq_init", peft_loftq_cpu)
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    ours = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"], init="loftq")
    )
    lf.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=1e-5)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2),
    )  # fmt: skip
    made = peft.get_peft_model(copy.deepcopy(base), cfg)
    made.save_pretrained(tmp_path / "theirs")
    mine = lf.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert lf.list_adapters(mine) == ["default"]
    torch.testing.assert_close(logits(mine, ids), logits(made, ids), rtol=0, atol=1e-5)


def test_a_failed_load_puts_the_base_weights_back(tmp_path):
    base = tiny_gpt2().half()
    cfg = lf.LoraConfig(r=4, target_modules=["c_attn"], init="loftq", bias="all")
    lf.save_adapter(lf.inject(copy.deepcopy(base), cfg), tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    bias = next(k for k in tensors if k.endswith("c_proj.bias"))
    tensors[bias] = torch.full_like(tensors[bias], 1e6, dtype=torch.float32)  # overflows fp16 on copy-in
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match="overflows"):
        lf.load_adapter(target, tmp_path)
    for (k, v), (_, w) in zip(base.state_dict().items(), target.state_dict().items()):
        assert torch.equal(v, w), k


def test_benchmark_script_on_a_tiny_model():
    sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder next to `src`
    from benchmarks import loftq_error

    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": nn.init.kaiming_uniform_(torch.empty(64, 96), generator=g) for i in range(3)}
    lines = loftq_error.table({"tiny": weights, "absent": "not installed"}, rank=8, bits=4, iters_list=[1, 3])
    assert lines[2].split()[:3] == ["tiny", "3", "1"] and "skipped: not installed" in lines[-1]
    one, three = (float(line.split()[-1].rstrip("%")) for line in lines[2:4])
    assert 0 < one < three  # LoftQ reduces the error, and more with more iterations


def test_smollm2_loftq_output_closer_than_nf4(smollm2_dir):
    """On SmolLM2's first block: the LoftQ model (Q + s·B·A) is closer to the fp32 model's
    logits than the quantized one (Q alone)."""
    base = lf.load_model("builtin:smollm2")
    ids = torch.tensor([[1, 504, 3458, 314, 4649, 28, 2]])
    want = logits(base, ids)
    cfg = lf.LoraConfig(r=16, alpha=16, target_modules="all-linear", layers_to_transform=[0], init="loftq")
    model = lf.inject(base, cfg)
    got = logits(model, ids)
    with lf.disable_adapters(model):
        q_only = logits(model, ids)
    assert (got - want).abs().mean() < 0.95 * (q_only - want).abs().mean()


def test_peft_flow_loftq_then_4bit_base_then_load(tmp_path):
    """LoftQ on the full-precision model, its base (now Q) saved and loaded in 4-bit, the adapter
    loaded onto it: the 4-bit model computes Q + s·B·A, the LoftQ model's output."""
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="loftq")  # (every layer 4-bit later)
    model = lf.inject(tiny_llama(), cfg)
    want = logits(model, ids)
    lf.save_adapter(model, tmp_path / "adapter")
    base = lf.unload(model)  # holds Q now
    quantize(base, QuantConfig(blocksize=64, double_quant=False, compute_dtype=torch.float32))
    lf.load_adapter(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(base, ids), want, rtol=0, atol=1e-5)
    lf.save_adapter(base, tmp_path / "again")  # recorded as a plain init for the 4-bit stage
    import json

    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["init_lora_weights"] is True
