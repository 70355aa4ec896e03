"""``loraforge analyze`` / ``lf.analyze_adapter``: spectra of a known s·B·A, φ (1 for the same
subspace, a hand-computed case, the random baseline), the amplification factor (Linear and GPT-2
Conv1D bases), PNGs, JSON and one-line errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import loraforge as lf
from loraforge import cli
from loraforge.lowrank import spectra
from tests.conftest import randomize_lora, tiny_gpt2, tiny_llama

Q = "model.layers.0.self_attn.q_proj"


def _write(path, factors: dict, r: int, alpha: float, base=None, targets=("q_proj",), **kw):
    """An adapter over ``base`` (tiny llama by default) whose layers hold the given (A, B)."""
    model = lf.inject(
        copy.deepcopy(base or tiny_llama()),
        lf.LoraConfig(r=r, alpha=alpha, target_modules=list(targets), **kw),
    )
    randomize_lora(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    lf.save_adapter(model, path)
    return model


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def test_spectra_of_a_known_update(tmp_path):
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    u, v = _orthonormal(32, 4, 0), _orthonormal(32, 4, 1)
    # s·B·A = U·diag(σ)·Vᵀ with scale alpha/r = 0.5: B = U·diag(σ)/0.5, A = Vᵀ
    _write(tmp_path / "a", {Q: (v.T.float(), (u * s / 0.5).float())}, r=4, alpha=2)
    layer = lf.analyze_adapter(tmp_path / "a")["layers"][Q]
    assert layer["singular_values"] == pytest.approx([4, 2, 1, 1], rel=1e-5)
    p = [4 / 8, 2 / 8, 1 / 8, 1 / 8]
    assert layer["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-5)
    assert layer["stable_rank"] == pytest.approx((16 + 4 + 1 + 1) / 16, rel=1e-5)
    assert layer["energy_at"] == pytest.approx({1: 16 / 22, 2: 20 / 22, 4: 1.0}, rel=1e-5)
    assert layer["shape"] == [32, 32] and layer["rank"] == 4


def test_phi_is_one_for_the_same_subspace(tmp_path):
    model = _write(tmp_path / "a", {}, r=4, alpha=4, targets=("q_proj", "v_proj"))
    # the same update, A rotated inside its row space: A' = R·A, B' = B·Rᵀ (R orthogonal)
    rot = _orthonormal(4, 4, 3).float()
    rotated = {}
    for name in (Q, "model.layers.1.self_attn.v_proj"):
        layer = model.get_submodule(name)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        rotated[name] = (rot @ a, b @ rot.T)
    _write(tmp_path / "b", rotated, r=4, alpha=4, targets=("q_proj", "v_proj"))
    for other in (tmp_path / "a", tmp_path / "b"):
        sim = lf.analyze_adapter(tmp_path / "a", other=other)["similarity"]
        assert len(sim) == 4
        for v in sim.values():
            assert torch.allclose(
                torch.tensor(v["phi"], dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64), atol=1e-6
            )
            assert v["phi_1_1"] == pytest.approx(1) and v["mean_top"] == pytest.approx(1)


def test_phi_hand_computed_and_random_baseline(tmp_path):
    e = torch.eye(32)
    # A1's right singular vectors e1 (σ 2), e2 (σ 1); A2's (e1 + e3)/√2 (σ 3), e2 (σ 1)
    a1 = torch.stack([2 * e[0], e[1]])
    a2 = torch.stack([3 * (e[0] + e[2]) / math.sqrt(2), e[1]])
    b = torch.randn(32, 2)
    _write(tmp_path / "a", {Q: (a1, b)}, r=2, alpha=2)
    _write(tmp_path / "b", {Q: (a2, b)}, r=2, alpha=2)
    sim = lf.analyze_adapter(tmp_path / "a", other=tmp_path / "b", layers=[Q])["similarity"]
    assert list(sim) == [Q]
    # φ(1,1) = (e1·v1)² = 1/2; φ(1,2) = φ(2,1) = (1/2 + 0)/1; φ(2,2) = (1/2 + 1)/2
    assert sum(sim[Q]["phi"], []) == pytest.approx([0.5, 0.5, 0.5, 0.75], abs=1e-6)
    assert sim[Q]["diag"] == pytest.approx([0.5, 0.75], abs=1e-6)
    # random Gaussian A's: E φ(i, j) = max(i, j)/n, n = 32
    assert sim[Q]["random"]["phi_1_1"] == pytest.approx(1 / 32)
    assert sim[Q]["random"]["mean"] == pytest.approx((1 + 2 + 2 + 2) / 4 / 32)


def test_random_baseline_matches_a_sampled_draw(tmp_path):
    _write(tmp_path / "a", {}, r=8, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    sim = lf.analyze_adapter(tmp_path / "a", other=tmp_path / "a")["similarity"]
    expected = sum(v["random"]["mean"] for v in sim.values()) / len(sim)
    sampled = sum(v["random_sampled"]["mean"] for v in sim.values()) / len(sim)
    assert expected == pytest.approx(sum(max(i, j) for i in range(1, 9) for j in range(1, 9)) / 64 / 32)
    assert abs(sampled - expected) < 0.05 and all(
        0 <= v["random_sampled"]["phi_1_1"] <= 1 for v in sim.values()
    )


def _amp_by_hand(delta, w, seed_r):
    return spectra.amplification_factor(delta, w, seed_r)


def test_amplification_over_a_base_directory(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = _write(tmp_path / "a", {}, r=4, alpha=8, base=base, targets=("q_proj", "embed_tokens"))
    out = lf.analyze_adapter(tmp_path / "a", base=tmp_path / "base")["layers"]
    layer = model.get_submodule(Q)
    delta = spectra.delta_of(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0)
    w = base.get_submodule(Q).weight
    assert out[Q]["amplification"]["factor"] == pytest.approx(
        spectra.amplification_factor(delta, w), rel=1e-4
    )
    assert out[Q]["amplification"]["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
    assert out[Q]["amplification"]["random"] > 0
    emb = model.get_submodule("model.embed_tokens")  # ΔW (dim, num) against Wᵀ
    d_emb = spectra.delta_of(emb.lora_embedding_A["default"], emb.lora_embedding_B["default"], 2.0)
    expected = spectra.amplification_factor(d_emb, base.model.embed_tokens.weight.T)
    assert out["model.embed_tokens"]["amplification"]["factor"] == pytest.approx(expected, rel=1e-4)


def test_amplification_over_a_4bit_base(tmp_path):
    # a bitsandbytes-layout 4-bit checkpoint: the weights dequantized one at a time (as extract does)
    base = tiny_llama(vocab=128)
    model = _write(tmp_path / "a", {}, r=4, alpha=8, base=base)
    quantized = lf.quantize(copy.deepcopy(base), lf.QuantConfig(blocksize=64))
    lf.save_model(quantized, tmp_path / "base4")
    out = lf.analyze_adapter(tmp_path / "a", base=tmp_path / "base4")["layers"]
    layer = model.get_submodule(Q)
    delta = spectra.delta_of(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0)
    w = quantized.get_submodule(Q).dequantize(torch.float32)
    expected = spectra.amplification_factor(delta, w)
    assert out[Q]["amplification"]["factor"] == pytest.approx(expected, rel=1e-4)


def test_amplification_reads_gpt2_conv1d_transposed(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    model = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, alpha=2, target_modules=["c_proj"]))
    randomize_lora(model)
    lf.save_adapter(model, tmp_path / "a")
    out = lf.analyze_adapter(tmp_path / "a", base=tmp_path / "base", layers=["transformer.h.0.attn.c_proj"])
    layer = model.get_submodule("transformer.h.0.attn.c_proj")
    delta = spectra.delta_of(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 1.0)
    w = base.transformer.h[0].attn.c_proj.weight.T  # Conv1D stores (in, out); square here
    got = out["layers"]["transformer.h.0.attn.c_proj"]["amplification"]["factor"]
    assert got == pytest.approx(spectra.amplification_factor(delta, w), rel=1e-4)
    assert got != pytest.approx(spectra.amplification_factor(delta, w.T), rel=1e-3)


def test_plots_and_cli_json(tmp_path, capsys):
    _write(tmp_path / "a", {}, r=4, alpha=4, targets=("q_proj", "v_proj"))
    _write(tmp_path / "b", {}, r=2, alpha=4, targets=("q_proj",))
    args = ["analyze", str(tmp_path / "a"), "--other", str(tmp_path / "b"), "--plot", str(tmp_path / "png")]
    assert cli.main([*args, "--json", str(tmp_path / "out.json")]) == 0
    text = capsys.readouterr().out
    assert Q in text and "φ(1,1)" in text and "numbers written" in text
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data["similarity"]) == {Q, "model.layers.1.self_attn.q_proj"}  # (b has no v_proj)
    assert len(data["similarity"][Q]["phi"]) == 4 and len(data["similarity"][Q]["phi"][0]) == 2
    assert set(data["layers"][Q]["energy_at"]) == {"1", "2", "4"}
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == [f"phi_{Q}.png", "phi_model.layers.1.self_attn.q_proj.png", "singular_values.png"]
    for p in (tmp_path / "png").iterdir():
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    _write(tmp_path / "a", {}, r=2, alpha=2)
    wide = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip
    _write(tmp_path / "wide", {}, r=2, alpha=2, base=wide)
    _write(tmp_path / "k", {}, r=2, alpha=2, targets=("k_proj",))
    (tmp_path / "empty").mkdir()
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    wide.save_pretrained(tmp_path / "wide_base")
    cases = [
        (["--other", str(tmp_path / "wide")], "different models"),
        (["--other", str(tmp_path / "k")], "no LoRA layer in common"),
        (["--other", str(tmp_path / "missing")], "does not exist"),
        (["--layers", "nothing_here"], "name no LoRA layer"),
        (["--base", str(tmp_path / "gpt2")], "not this adapter's base model"),
        (["--base", str(tmp_path / "empty")], "empty"),
        (["--base", str(tmp_path / "wide_base")], "an adapter for another model"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert cli.main(["analyze", str(tmp_path / "a"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert cli.main(["analyze", str(tmp_path / "empty")]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
