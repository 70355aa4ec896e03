"""(IA)³ (issue 18, item 5): pinned against peft 0.21 on the same vectors — forward, gradients,
merged weights, files both ways — plus the rest of the adapter API and bad files."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import assert_unchanged, logits, snapshot, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import loraforge as lf
from loraforge.methods.ia3_layer import IA3Layer

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture
def ids():
    return torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(7))


def randomize(model, seed: int = 1, std: float = 0.5) -> None:
    """Vectors away from ones, so that every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1 + std * torch.randn(p.shape, generator=g))


def copy_vectors(ours, theirs, adapter: str = "default") -> None:
    """Our live vectors into a PEFT model (its parameter names carry the adapter name)."""
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".ia3_l." in name:
                path = name.removeprefix("base_model.model.").rsplit(".", 1)[0]
                p.copy_(mine[f"{path}.{adapter}"])


def vectors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".ia3_l." in n}


# -- config -----------------------------------------------------------------------------------
def test_config_validation_and_from_dict():
    with pytest.raises(
        ValueError, match=r"unknown IA3 config key 'feedforward' \(did you mean 'feedforward_modules'"
    ):
        lf.IA3Config.from_dict({"feedforward": ["down_proj"]})
    with pytest.raises(ValueError, match="init_ia3_weights must be true or false"):
        lf.IA3Config.from_dict({"init_ia3_weights": "no"})
    with pytest.raises(ValueError, match=r"subset of target_modules.*\['fc'\]"):
        lf.IA3Config(target_modules=["q"], feedforward_modules=["fc"])
    with pytest.raises(ValueError, match="not a valid regex"):
        lf.IA3Config(target_modules="(")
    cfg = lf.IA3Config.from_dict(
        {"target_modules": ("k_proj", "down_proj"), "feedforward_modules": ["down_proj"]}
    )
    assert cfg.target_modules == ["k_proj", "down_proj"] and lf.IA3Config(**cfg.to_dict()) == cfg


def test_config_file_keys_match_peft_and_roundtrip(tmp_path):
    theirs = peft.get_peft_model(
        tiny_llama(),
        peft.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        ),
    )
    theirs.save_pretrained(tmp_path)
    peft_json = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_json["target_modules"] = sorted(peft_json["target_modules"])  # (PEFT writes a set's order)
    cfg = lf.IA3Config.from_peft_dict(peft_json)
    assert cfg == lf.IA3Config(target_modules=["down_proj", "k_proj"], feedforward_modules=["down_proj"])
    ours = cfg.to_peft_dict(task_type="CAUSAL_LM")
    assert set(ours) == set(peft_json) - {"peft_version"}
    assert ours == {k: peft_json[k] for k in ours}
    assert lf.IA3Config.from_peft_dict(ours) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"init_ia3_weights": 1}, "init_ia3_weights must be true or false"),
        ({"target_modules": 5}, "target_modules must be a string"),
        ({"surprise": {"a": 1}}, "unknown config key"),
        ({"task_type": 3}, "task_type must be a string"),
        ({"peft_type": "LORA"}, None),
    ],
)
def test_config_from_peft_dict_refuses_bad_values(change, message):
    data = lf.IA3Config(target_modules=["k_proj"], feedforward_modules=[]).to_peft_dict()
    data.update(change)
    if message is None:  # routed to another config class by peft_type: not ours to parse
        with pytest.raises(ValueError, match="expected 'IA3'"):
            lf.IA3Config.from_peft_dict(data)
        return
    with pytest.raises(ValueError, match=message):
        lf.IA3Config.from_peft_dict(data, source="x/adapter_config.json")


def test_defaults_by_model_type_and_clear_error_without():
    m = lf.inject(tiny_llama(), lf.IA3Config())
    layer = m.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, IA3Layer) and isinstance(layer.mlp.down_proj, IA3Layer)
    assert not isinstance(layer.self_attn.q_proj, IA3Layer)
    assert layer.mlp.down_proj.feedforward == {"default": True}
    assert layer.self_attn.k_proj.ia3_l["default"].shape == (16, 1)  # (out, 1): 2 kv heads x 8
    assert layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)  # (1, in)
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="IA3Config.target_modules is required for Sequential"):
        lf.inject(plain, lf.IA3Config())
    with pytest.raises(ValueError, match=r"feedforward_modules is required.*feedforward_modules=\[\]"):
        lf.inject(plain, lf.IA3Config(target_modules=["0"]))
    with pytest.raises(ValueError, match=r"matched no module of Sequential.*\['0'\]"):
        lf.inject(plain, lf.IA3Config(target_modules=["fc"], feedforward_modules=[]))
    emb = nn.Sequential(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="'0' is a Embedding; .*supports nn.Linear"):
        lf.inject(emb, lf.IA3Config(target_modules=["0"], feedforward_modules=[]))
    assert type(emb[0]) is nn.Embedding and emb[0].weight.requires_grad  # untouched: not even frozen


# -- pinned against PEFT ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_and_gradients_match_peft(ids, arch):
    base = BUILDERS[arch]()
    for module in base.modules():  # (train mode, without dropout's randomness)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ours = lf.inject(copy.deepcopy(base), lf.IA3Config(init_ia3_weights=False)).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False)).train()
    copy_vectors(ours, theirs)
    out_ours, out_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=0, atol=1e-5)
    assert (out_ours.logits - logits(base, ids)).abs().max() > 1e-2
    out_ours.loss.backward()
    out_theirs.loss.backward()
    mine = dict(ours.named_parameters())
    compared = 0
    for name, p in theirs.named_parameters():
        if ".ia3_l." in name:
            ours_grad = mine[name.removeprefix("base_model.model.")].grad
            torch.testing.assert_close(ours_grad, p.grad, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == {"llama": 6, "gpt2": 4}[arch]  # 2 layers x (k, v, down) / (c_attn, mlp.c_proj)
    # only the vectors get gradients (the base is frozen)
    with_grad = [n for n, p in ours.named_parameters() if p.grad is not None]
    assert with_grad and all(".ia3_l." in n for n in with_grad)
    assert all(p.requires_grad == (".ia3_l." in n) for n, p in ours.named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_weights_match_peft_and_unmerge_is_exact(ids, arch):
    base = BUILDERS[arch]()
    ours = lf.inject(copy.deepcopy(base), lf.IA3Config(init_ia3_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False))
    copy_vectors(ours, theirs)
    expected = logits(ours, ids)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    lf.merge(ours)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    lf.unmerge(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # bit for bit
    merged_ours = lf.merge_and_unload(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for k in merged_ours:
        torch.testing.assert_close(merged_ours[k], merged_theirs[k], rtol=0, atol=0)
    assert not any(isinstance(m, IA3Layer) for m in ours.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_files_both_ways_with_peft(tmp_path, ids, arch):
    base = BUILDERS[arch]()
    ours = lf.inject(copy.deepcopy(base), lf.IA3Config(init_ia3_weights=False))
    expected = logits(ours, ids)
    lf.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-5)
    # PEFT's save -> ours
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = lf.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, ids), logits(peft_model, ids), rtol=0, atol=1e-5)
    # the keys are PEFT's, without the adapter name
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )


def test_file_layout(tmp_path):
    m = lf.inject(tiny_gpt2(), lf.IA3Config(), adapter="pirate")
    lf.save_adapter(m, tmp_path, adapter="pirate")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (96, 1)
    assert tensors["base_model.model.transformer.h.1.mlp.c_proj.ia3_l"].shape == (1, 128)
    assert len(tensors) == 4 and all(torch.equal(t, torch.ones_like(t)) for t in tensors.values())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and list(cfg) == sorted(cfg)


def test_all_linear_file_loads_in_peft(tmp_path, ids):
    # PEFT saves "all-linear" expanded but keeps feedforward_modules as given, which its own
    # subset rule then refuses on load; ours narrows feedforward_modules to the adapted paths.
    base = tiny_llama()
    ours = lf.inject(
        copy.deepcopy(base),
        lf.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"], init_ia3_weights=False),
    )
    lf.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == 14
    assert cfg["feedforward_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=1e-5)
    again = lf.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=0, atol=0)


def test_modules_to_save_both_ways_with_peft(tmp_path):
    base = tiny_bert()
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    cfg = peft.IA3Config(
        target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
        modules_to_save=["classifier"],
        init_ia3_weights=False,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in ours.classifier.modules_to_save["default"].parameters())
    lf.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, x), logits(theirs, x), rtol=0, atol=1e-5)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, groups=2)
        self.conv3 = nn.Conv3d(2, 3, 1)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.conv3(h.view(h.shape[0], 2, 4, *h.shape[2:])).flatten(1)


@pytest.mark.parametrize("feedforward", [["conv2"], ["conv1", "conv3"]])
def test_conv_matches_peft_and_unmerge_is_exact(feedforward):
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    targets = ["conv1", "conv2", "conv3"]
    ours = lf.inject(
        ConvNet(),
        lf.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False),
    )
    theirs = peft.get_peft_model(
        ConvNet(),
        peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False),
    )
    copy_vectors(ours, theirs)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(expected, theirs(x), rtol=0, atol=1e-5)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        lf.merge(ours)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
        lf.unmerge(ours)
        assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
        merged_ours = lf.merge_and_unload(ours).state_dict()
        merged_theirs = theirs.merge_and_unload().state_dict()
    for k in merged_ours:
        torch.testing.assert_close(merged_ours[k], merged_theirs[k], rtol=1e-6, atol=1e-7)


# -- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unmerge_is_bit_exact_with_zeros_and_several_adapters(dtype, ids):
    m = tiny_llama().to(dtype)
    lf.inject(
        m,
        lf.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        adapter="a",
    )
    lf.add_adapter(m, "b", lf.IA3Config(target_modules=["k_proj", "up_proj"], feedforward_modules=[]))
    randomize(m, std=2.0)
    with torch.no_grad():
        m.model.layers[0].self_attn.k_proj.ia3_l["a"][:3] = 0.0  # division by zero on unmerge
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lf.set_adapter(m, ["a", "b"])
    expected = logits(m, ids)
    lf.merge(m, "a")
    lf.merge(m, "b")
    assert lf.merged_adapters(m) == ["a", "b"]
    tol = 1e-5 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(logits(m, ids), expected, rtol=0, atol=tol)
    lf.unmerge(m, "a")  # b stays merged
    lf.merge(m, "a")
    lf.unmerge(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(logits(m, ids), expected)


def test_several_active_adapters_multiply_like_peft(ids):
    base = tiny_llama()
    cfg = dict(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    )
    ours = lf.inject(copy.deepcopy(base), lf.IA3Config(**cfg), adapter="one")
    lf.add_adapter(ours, "two", lf.IA3Config(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg), adapter_name="one")
    theirs.add_adapter("two", peft.IA3Config(**cfg))
    for name in ("one", "two"):
        mine = dict(ours.named_parameters())
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if n.endswith(f".ia3_l.{name}"):
                    p.copy_(mine[n.removeprefix("base_model.model.")])
    lf.set_adapter(ours, ["one", "two"])
    theirs.base_model.set_adapter(["one", "two"])
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


# -- the rest of the API --------------------------------------------------------------------
def test_switch_disable_delete_unload(ids):
    base = tiny_llama()
    plain = logits(base, ids)
    m = lf.inject(copy.deepcopy(base), lf.IA3Config(init_ia3_weights=False), adapter="a")
    lf.add_adapter(m, "b", lf.IA3Config(init_ia3_weights=False))
    out_a = logits(m, ids)
    lf.set_adapter(m, "b")
    out_b = logits(m, ids)
    assert (out_a - out_b).abs().max() > 1e-2
    assert all(p.requires_grad == n.endswith(".ia3_l.b") for n, p in m.named_parameters())
    lf.merge(m)
    with lf.disable_adapters(m):
        torch.testing.assert_close(logits(m, ids), plain, rtol=0, atol=0)
    assert lf.merged_adapters(m) == ["b"]
    torch.testing.assert_close(logits(m, ids), out_b, rtol=0, atol=1e-5)
    lf.delete_adapter(m, "b")  # unmerges first
    assert lf.list_adapters(m) == ["a"] and lf.merged_adapters(m) == []
    torch.testing.assert_close(logits(m, ids), out_a, rtol=0, atol=0)
    lf.unload(m)
    assert [type(x) for x in m.modules()] == [type(x) for x in base.modules()]
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in m.state_dict().items())


def test_mixed_batch_equals_per_adapter_runs(ids):
    m = lf.inject(tiny_llama(), lf.IA3Config(init_ia3_weights=False), adapter="a")
    # b: other targets, its attention vectors on the input side
    lf.add_adapter(
        m,
        "b",
        lf.IA3Config(
            target_modules=["q_proj", "k_proj", "up_proj"],
            feedforward_modules=["q_proj"],
            init_ia3_weights=False,
        ),
    )
    per = {}
    for name in ("a", "b"):
        lf.set_adapter(m, name)
        per[name] = logits(m, ids)
    with lf.disable_adapters(m):
        per["__base__"] = logits(m, ids)
    rows = ["b", "__base__", "a"]
    with lf.adapter_batch(m, rows):
        mixed = logits(m, ids)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], per[name][i], rtol=0, atol=1e-6)
    lf.merge(m, "b")
    with pytest.raises(RuntimeError, match="unmerge"):
        with lf.adapter_batch(m, rows):
            pass


def test_training_a_merged_adapter_is_refused(ids):
    m = lf.inject(tiny_llama(), lf.IA3Config()).train()
    lf.merge(m)
    with pytest.raises(RuntimeError, match="merged into the base weights"):
        m(ids, labels=ids)


# -- 4-bit base -------------------------------------------------------------------------------
def _dequantized_copy(q):
    from loraforge.adapters import _dequantized_linear
    from loraforge.kinds import is_4bit, replace_module

    d = copy.deepcopy(q)
    for name, mod in list(d.named_modules()):
        if is_4bit(mod):
            replace_module(d, name, _dequantized_linear(mod))
    return d


def test_4bit_base_forward_merge_unmerge(ids):
    from loraforge.quant import Linear4bit, QuantConfig

    q = lf.quantize(tiny_llama(), QuantConfig(compute_dtype=torch.float32))
    ref = _dequantized_copy(q)
    cfg = lf.IA3Config(init_ia3_weights=False)
    lf.inject(q, cfg)
    lf.inject(ref, cfg)
    ref.load_state_dict({k: v for k, v in q.state_dict().items() if ".ia3_l." in k}, strict=False)
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, IA3Layer) and isinstance(layer.base_layer, Linear4bit)
    expected = logits(ref, ids)
    torch.testing.assert_close(logits(q, ids), expected, rtol=0, atol=1e-5)
    packed = {n: m.weight.clone() for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    with pytest.warns(UserWarning, match="requantization"):
        lf.merge(q)
    torch.testing.assert_close(logits(q, ids), expected, rtol=0, atol=0.5)  # (requantized)
    lf.unmerge(q)
    assert all(torch.equal(m.weight, packed[n]) for n, m in q.named_modules() if isinstance(m, Linear4bit))
    torch.testing.assert_close(logits(q, ids), expected, rtol=0, atol=1e-5)
    # merged and unloaded as 4-bit: requantized, with the same warning as a LoRA merge there
    with pytest.warns(UserWarning, match="requantization"):
        requantized = lf.merge_and_unload(copy.deepcopy(q))
    assert isinstance(requantized.model.layers[0].mlp.down_proj, Linear4bit)
    torch.testing.assert_close(logits(requantized, ids), expected, rtol=0, atol=0.5)
    # dequantize=True: full-precision linears holding dequant(W) ⊙ l, the forward unchanged
    merged = lf.merge_and_unload(q, dequantize=True)
    assert not any(isinstance(m, IA3Layer) for m in merged.modules())
    assert type(merged.model.layers[1].mlp.down_proj) is nn.Linear  # (untargeted layers stay 4-bit)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)


# -- bad files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["shape", "nan", "missing", "extra", "int", "config"])
def test_bad_files_are_refused_and_model_untouched(tmp_path, damage):
    m = lf.inject(tiny_llama(), lf.IA3Config(), adapter="a")
    lf.save_adapter(m, tmp_path, adapter="a")
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    expect = {
        "shape": r"'model.layers.0.mlp.down_proj.ia3_l': file has \(64, 1\), model expects \(1, 64\)",
        "nan": "holds 1 NaN/Inf",
        "missing": "is missing",
        "extra": "match no module",
        "int": "is int64",
        "config": "feedforward_modules must be a string",
    }[damage]
    if damage == "shape":
        tensors[key] = tensors[key].T.contiguous()
    elif damage == "nan":
        tensors[key][0, 3] = float("nan")
    elif damage == "missing":
        del tensors[key]
    elif damage == "extra":
        tensors["base_model.model.model.layers.0.mlp.up_proj.ia3_l"] = torch.ones(1, 32)
    elif damage == "int":
        tensors[key] = torch.ones(1, 64, dtype=torch.int64)
    else:
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg["feedforward_modules"] = 7
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, weights)
    snap = snapshot(m)
    with pytest.raises(ValueError, match=expect) as e:
        lf.load_adapter(m, tmp_path, adapter="b")
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    assert_unchanged(m, snap)
    assert lf.list_adapters(m) == ["a"]


def test_modules_to_save_tensor_missing_is_one_clear_line(tmp_path):
    base = tiny_bert()
    cfg = lf.IA3Config(target_modules=["value"], feedforward_modules=[], modules_to_save=["classifier"])
    lf.save_adapter(lf.inject(copy.deepcopy(base), cfg), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.classifier.bias"]
    save_file(tensors, weights)
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"lacks tensors its config implies.*classifier\.bias"):
        lf.load_adapter(base, tmp_path)
    assert_unchanged(base, snap)


def test_lora_and_ia3_on_one_module_is_refused():
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=2, target_modules=["k_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="already holds a LoRA adapter"):
            lf.add_adapter(m, "ia3", lf.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    assert lf.list_adapters(m) == ["default"]


def test_add_weighted_adapter_matches_peft(ids):
    base = tiny_llama()
    cfg_one = dict(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    cfg_two = dict(target_modules=["k_proj", "v_proj"], feedforward_modules=[], init_ia3_weights=False)
    ours = lf.inject(copy.deepcopy(base), lf.IA3Config(**cfg_one), adapter="one")
    lf.add_adapter(ours, "two", lf.IA3Config(**cfg_two))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg_one), adapter_name="one")
    theirs.add_adapter("two", peft.IA3Config(**cfg_two))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".ia3_l." in n:
                p.copy_(mine[n.removeprefix("base_model.model.")])
    lf.add_weighted_adapter(ours, ["one", "two"], [0.7, 0.3], "mix")
    theirs.add_weighted_adapter(["one", "two"], [0.7, 0.3], "mix")
    assert lf.list_adapters(ours) == ["one", "two", "mix"]
    lf.set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(logits(ours, ids), logits(theirs.eval(), ids), rtol=0, atol=1e-5)
    # shapes disagree (one scales k_proj's output, the other its input): refused
    lf.add_adapter(ours, "three", lf.IA3Config(target_modules=["k_proj"], feedforward_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"self_attn.k_proj' some of \['one', 'three'\] scale the input"):
        lf.add_weighted_adapter(ours, ["one", "three"], [0.5, 0.5], "bad")
    assert "bad" not in lf.list_adapters(ours)


def test_add_weighted_adapter_refuses_other_methods_clearly():
    m = lf.inject(tiny_llama(), lf.IA3Config(), adapter="ia3")
    lf.add_adapter(m, "lora", lf.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match=r"combines LoRA adapters or IA3 adapters; got \['IA3Config', 'LoraConfig'\]"
    ):
        lf.add_weighted_adapter(m, ["ia3", "lora"], [0.5, 0.5], "mix")


def test_safe_merge_refuses_a_vector_that_would_overflow(ids):
    m = tiny_llama().to(torch.float16)
    lf.inject(m, lf.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.ia3_l["default"][0, 5] = 1e30  # fp32 vector: finite; W·l is not
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"would put NaN/Inf into the weight of 'model.layers.1.mlp.down_proj'"
    ):
        lf.merge(m, safe=True)
    assert lf.merged_adapters(m) == []
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
