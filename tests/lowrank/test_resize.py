"""``loraforge resize`` / ``lf.resize_adapter``: exact at full rank (loraforge and PEFT load the
result with the original's outputs), the best rank-R / energy-E truncation below it, every layout
(Linear, Conv2d, Embedding, GPT-2 Conv1D), copied extras, and one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loraforge as lf
from loraforge import cli
from loraforge.lowrank import spectra
from tests.conftest import randomize_lora, tiny_gpt2, tiny_llama

WEIGHTS = "adapter_model.safetensors"
P = "base_model.model."


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, float(b.abs().max())))


def _saved(base, cfg, path, seed=1):
    model = lf.inject(copy.deepcopy(base), cfg)
    randomize_lora(model, std=0.3, seed=seed)
    lf.save_adapter(model, path)
    return model.eval()


def _logits(base, path, ids):
    model = lf.load_adapter(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        return model(ids).logits


def _delta(tensors, cfg, name, a_key="lora_A.weight", b_key="lora_B.weight"):
    a, b = tensors[f"{P}{name}.{a_key}"], tensors[f"{P}{name}.{b_key}"]
    return cfg.scaling(name) * (spectra.as_matrix(b, torch.float64) @ spectra.as_matrix(a, torch.float64))


LLAMA_CFG = dict(
    r=8,
    alpha=16,
    use_rslora=True,
    target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    rank_pattern={"v_proj": 4},
    alpha_pattern={"down_proj": 3},
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    base = tiny_llama()
    src = tmp_path_factory.mktemp("resize") / "src"
    _saved(base, lf.LoraConfig(**LLAMA_CFG), src)
    ids = torch.randint(0, 96, (2, 7))
    return base, src, ids, _logits(base, src, ids)


def test_full_rank_is_exact_for_loraforge_and_peft(llama, tmp_path, one_thread):
    base, src, ids, expected = llama
    report = lf.resize_adapter(src, tmp_path / "out", rank=64)
    assert {r["new_rank"] for r in report.layers} == {8, 4}  # capped at each layer's rank
    assert all(r["new_rank"] == r["old_rank"] and r["energy"] > 1 - 1e-9 for r in report.layers)
    assert report.params_after == report.params_before
    _close(_logits(base, tmp_path / "out", ids), expected)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["r"] == cfg["lora_alpha"] == 8
    assert set(cfg["rank_pattern"].values()) == {4} and cfg["rank_pattern"] == cfg["alpha_pattern"]

    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        _close(theirs(ids).logits, expected)


def test_rank_truncation_is_the_best_rank_r_approximation(llama, tmp_path):
    _, src, _, _ = llama
    report = lf.resize_adapter(src, tmp_path / "out", rank=2)
    old_cfg = lf.LoraConfig.from_peft_dict(json.loads((src / "adapter_config.json").read_text()))
    new_cfg = lf.LoraConfig.from_peft_dict(json.loads((tmp_path / "out" / "adapter_config.json").read_text()))
    old, new = load_file(str(src / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
    for row in report.layers:
        name = row["name"]
        emb = name.endswith("embed_tokens")
        keys = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        assert new_cfg.rank_and_alpha(name) == (2, 2) and new_cfg.scaling(name) == 1.0
        d_old, d_new = _delta(old, old_cfg, name, *keys), _delta(new, new_cfg, name, *keys)
        u, s, vh = torch.linalg.svd(d_old)
        _close(d_new, (u[:, :2] * s[:2]) @ vh[:2])  # Eckart–Young: the top-2 SVD terms
        assert row["energy"] == pytest.approx(float(s[:2].square().sum() / s.square().sum()), rel=1e-9)
        assert row["energy"] < 1
    # embedding layout: A (r, num_embeddings), B (dim, r)
    assert new[f"{P}model.embed_tokens.lora_embedding_A"].shape == (2, 96)
    assert new[f"{P}model.embed_tokens.lora_embedding_B"].shape == (32, 2)


def test_energy_picks_the_smallest_rank_per_layer(llama, tmp_path):
    _, src, _, _ = llama
    report = lf.resize_adapter(src, tmp_path / "out", energy=0.8)
    old_cfg = lf.LoraConfig.from_peft_dict(json.loads((src / "adapter_config.json").read_text()))
    old = load_file(str(src / WEIGHTS))
    for row in report.layers:
        emb = row["name"].endswith("embed_tokens")
        keys = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        s = torch.linalg.svdvals(_delta(old, old_cfg, row["name"], *keys))
        assert row["new_rank"] == spectra.rank_for_energy(s, 0.8) and row["energy"] >= 0.8


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.lin = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        x = self.emb(ids).permute(0, 2, 1)[..., None].expand(-1, -1, -1, 3)  # (n, 6, L, 3)
        return self.head(self.lin(self.conv(x).mean((2, 3))))


def test_conv_embedding_linear_layouts_and_modules_to_save(tmp_path):
    torch.manual_seed(0)
    base = ConvNet().eval()
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules=["emb", "conv", "lin"], modules_to_save=["head"])
    model = _saved(base, cfg, tmp_path / "src")
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        model.head.modules_to_save["default"].weight.add_(1.0)  # a saved copy that differs from the base
    lf.save_adapter(model, tmp_path / "src2")
    with torch.no_grad():
        expected = model(ids)
    lf.resize_adapter(tmp_path / "src2", tmp_path / "full", rank=4)
    out = lf.load_adapter(copy.deepcopy(base), tmp_path / "full").eval()
    with torch.no_grad():
        _close(out(ids), expected)
    old, new = load_file(str(tmp_path / "src2" / WEIGHTS)), load_file(str(tmp_path / "full" / WEIGHTS))
    saved = [k for k in old if "head" in k]
    assert saved and all(torch.equal(old[k], new[k]) for k in saved)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "full")).eval()
    with torch.no_grad():
        _close(theirs(ids), expected)
    lf.resize_adapter(tmp_path / "src2", tmp_path / "r1", rank=1)
    small = load_file(str(tmp_path / "r1" / WEIGHTS))
    assert small[f"{P}conv.lora_A.weight"].shape == (1, 6, 3, 3)
    assert small[f"{P}conv.lora_B.weight"].shape == (5, 1, 1, 1)
    assert small[f"{P}emb.lora_embedding_A"].shape == (1, 20)
    lf.load_adapter(copy.deepcopy(base), tmp_path / "r1")  # (shapes agree with the model)


def test_gpt2_conv1d_and_lora_bias_full_rank_exact(tmp_path):
    base = tiny_gpt2()
    ids = torch.randint(0, 96, (2, 6))
    cfg = lf.LoraConfig(r=4, alpha=12, target_modules=["c_attn", "c_proj"], lora_bias=True)
    model = _saved(base, cfg, tmp_path / "src")
    with torch.no_grad():
        expected = model(ids).logits
    lf.resize_adapter(tmp_path / "src", tmp_path / "out", rank=4)
    _close(_logits(base, tmp_path / "out", ids), expected)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        _close(theirs(ids).logits, expected)


def test_zero_update_layers_keep_rank_one(tmp_path):
    base = tiny_llama()
    model = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0
    lf.save_adapter(model, tmp_path / "src")
    report = lf.resize_adapter(tmp_path / "src", tmp_path / "out", energy=0.5)
    assert {r["new_rank"] for r in report.layers} == {1} and all(r["energy"] == 1.0 for r in report.layers)
    lf.load_adapter(copy.deepcopy(base), tmp_path / "out")


def test_cli_table_and_json(llama, tmp_path, capsys):
    _, src, _, _ = llama
    assert cli.main(["resize", str(src), "--rank", "2", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "parameters" in text and "file" in text
    assert cli.main(["resize", str(src), "--energy", "0.9", str(tmp_path / "b"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params_after"] <= data["params_before"] and data["layers"][0]["old_rank"] in (4, 8)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "rank must be an integer >= 1"),
        (["--rank", "-3"], "rank must be an integer >= 1"),
        (["--energy", "1.5"], "energy must be a number in (0, 1]"),
        (["--energy", "0"], "energy must be a number in (0, 1]"),
        (["--energy", "nan"], "energy must be a number in (0, 1]"),
    ],
)
def test_cli_bad_requests(llama, tmp_path, capsys, args, message):
    _, src, _, _ = llama
    assert cli.main(["resize", str(src), *args, str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [[], ["--rank", "2", "--energy", "0.5"]])
def test_cli_needs_exactly_one_of_rank_and_energy(llama, tmp_path, capsys, args):
    _, src, _, _ = llama
    with pytest.raises(SystemExit) as e:
        cli.main(["resize", str(src), *args, str(tmp_path / "o")])
    assert e.value.code == 2 and "--rank" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(llama, tmp_path, capsys):
    _, src, _, _ = llama
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "nofile").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    base = tiny_llama()
    ia3 = lf.inject(copy.deepcopy(base), lf.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    lf.save_adapter(ia3, tmp_path / "ia3")
    dora = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    lf.save_adapter(dora, tmp_path / "dora")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "nofile"): "adapter_config.json is missing",
        str(tmp_path / "noweights"): "adapter_model.safetensors is missing",
        str(tmp_path / "ia3"): "IA3 adapter; resize works on LoRA adapters",
        str(tmp_path / "dora"): "a DoRA adapter",
    }
    for path, message in cases.items():
        assert cli.main(["resize", path, "--rank", "2", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (path, err)
    assert cli.main(["resize", str(src), "--rank", "2", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_energy_one_is_exact(llama, tmp_path):
    base, src, ids, expected = llama
    report = lf.resize_adapter(src, tmp_path / "out", energy=1.0)
    assert all(r["new_rank"] == r["old_rank"] for r in report.layers)  # random factors: full rank
    _close(_logits(base, tmp_path / "out", ids), expected)


def test_trainable_tokens_copied_unchanged(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 96, (2, 6))
    cfg = lf.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    model = _saved(base, cfg, tmp_path / "src")
    with torch.no_grad():
        expected = model(ids).logits
    lf.resize_adapter(tmp_path / "src", tmp_path / "out", rank=4)
    old, new = load_file(str(tmp_path / "src" / WEIGHTS)), load_file(str(tmp_path / "out" / WEIGHTS))
    tokens = [k for k in old if "trainable_tokens" in k]
    assert tokens and all(torch.equal(old[k], new[k]) for k in tokens)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["trainable_token_indices"] == [
        3,
        5,
    ]
    _close(_logits(base, tmp_path / "out", ids), expected)


def test_bfloat16_factors_stay_bfloat16(llama, tmp_path):
    _, src, _, _ = llama
    (tmp_path / "bf16").mkdir()
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(src / WEIGHTS)).items()}
    save_file(tensors, str(tmp_path / "bf16" / WEIGHTS))
    (tmp_path / "bf16" / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    lf.resize_adapter(tmp_path / "bf16", tmp_path / "out", rank=3)
    new = load_file(str(tmp_path / "out" / WEIGHTS))
    assert {t.dtype for t in new.values()} == {torch.bfloat16}
    assert new[f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 32)


def test_factored_is_the_update_without_forming_it():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, 2, 2, generator=g), torch.randn(5, 3, 1, 1, generator=g)  # a conv pair
    qb, core, qa = spectra.factored(a, b, 0.7)
    full = 0.7 * spectra.as_matrix(b, torch.float64) @ spectra.as_matrix(a, torch.float64)
    _close(qb @ core @ qa.T, full)
    _close(torch.linalg.svdvals(core), torch.linalg.svdvals(full)[:3])


def test_factored_amplification_matches_the_dense_one():
    g = torch.Generator().manual_seed(1)
    a, b, w = torch.randn(4, 9, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, 9, generator=g)
    dense = spectra.amplification_factor(spectra.delta_of(a, b, 0.3), w)
    assert spectra.factored_amplification(a, b, 0.3, w) == pytest.approx(dense, rel=1e-6)
    b[:, 2:] = 0  # numerical rank 2: the same rule
    dense = spectra.amplification_factor(spectra.delta_of(a, b, 0.3), w)
    assert spectra.factored_amplification(a, b, 0.3, w) == pytest.approx(dense, rel=1e-6)


def test_sv_ratio_keeps_singular_values_above_max_over_ratio(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=torch.float64))[0]
    model = lf.inject(tiny_llama(), lf.LoraConfig(r=4, alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():  # ΔW's singular values 4, 2, 1, 0.5 in every layer
        for i in range(2):
            layer = model.get_submodule(f"model.layers.{i}.self_attn.q_proj")
            layer.lora_A["default"].weight.copy_(v.T)
            layer.lora_B["default"].weight.copy_(u * torch.tensor([4, 2, 1, 0.5], dtype=torch.float64))
    lf.save_adapter(model, tmp_path / "src")
    for ratio, kept in ((3, 2), (1, 1), (100, 4)):
        report = lf.resize_adapter(tmp_path / "src", tmp_path / f"r{ratio}", sv_ratio=ratio)
        assert {r["new_rank"] for r in report.layers} == {kept}, ratio
    assert cli.main(["resize", str(tmp_path / "src"), "--sv-ratio", "0.5", str(tmp_path / "x")]) == 2
    assert "sv_ratio must be a number >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one of rank, energy and sv_ratio"):
        lf.resize_adapter(tmp_path / "src", tmp_path / "y", rank=2, sv_ratio=3)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.block = nn.Module()
        self.block.lin = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)

    def forward(self, x):
        return self.c(self.block.lin(self.lin(x)))


def test_rank_pattern_keys_that_would_match_another_layer_are_anchored(tmp_path):
    torch.manual_seed(0)
    base = Nested().eval()
    model = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, alpha=2, target_modules=["lin", "c"]))
    randomize_lora(model)
    with torch.no_grad():
        model.lin.lora_B["default"].weight[:, 1] = 0  # `lin` has rank 1, `block.lin` and `c` rank 2
    lf.save_adapter(model.eval(), tmp_path / "src")
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = model(x)
    report = lf.resize_adapter(tmp_path / "src", tmp_path / "out", energy=1.0)
    assert {r["name"]: r["new_rank"] for r in report.layers} == {"lin": 1, "block.lin": 2, "c": 2}
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"^lin": 1}  # (a plain "lin" would also match block.lin)
    out = lf.load_adapter(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        _close(out(x), expected)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    assert (
        theirs.base_model.model.block.lin.r["default"] == 2 and theirs.base_model.model.lin.r["default"] == 1
    )
    with torch.no_grad():
        _close(theirs(x), expected)
