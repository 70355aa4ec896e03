"""Bottleneck adapters (issue 18, item 6): pinned against AdapterHub's ``adapters`` 1.3.0 through a
saved fixture (tests/methods/make_adapterhub_fixture.py: its seq_bn / double_seq_bn / par_bn on a
tiny Llama and GPT-2, its saved tensors and its logits), plus the rest of the adapter API."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, logits, randomize_lora, snapshot, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import loraforge as lf
from loraforge.layers import LoraLayer
from loraforge.methods.bottleneck import (
    PREFIX,
    adapterhub_keys,
    expected_shapes,
    find_targets,
    load_adapterhub,
)
from loraforge.methods.bottleneck_layer import BottleneckLayer

FIXTURES = Path(__file__).parent / "fixtures"
HUB = {"seq_bn": "pfeiffer", "double_seq_bn": "houlsby", "par_bn": "parallel"}


@pytest.fixture
def ids():
    return torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(7))


def randomize(model, seed: int = 1, std: float = 0.3) -> None:
    """Random adapter weights (the default init starts at the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter_down." in name or ".adapter_up." in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def hub_base(arch: str):
    """The fixture's tiny model: its config, its weights, its inputs and tensors."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    meta = json.loads((FIXTURES / "adapterhub.json").read_text())
    tensors = load_file(FIXTURES / f"adapterhub_{arch}.safetensors")
    config = meta["models"][arch]["config"]
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**config))
    else:
        model = GPT2LMHeadModel(GPT2Config(**config))
    state = {k.removeprefix("base."): v for k, v in tensors.items() if k.startswith("base.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if k != "lm_head.weight"] and not unexpected  # (GPT-2: tied head)
    return model.eval(), torch.tensor(meta["ids"]), tensors, meta["models"][arch]["adapters"]


# -- pinned against AdapterHub ----------------------------------------------------------------
def hub_dir(tmp_path, tensors, hub_configs, hub_name) -> Path:
    """The directory AdapterHub's save_adapter wrote: its adapter_config.json and adapter.safetensors."""
    d = tmp_path / "hub"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(hub_configs[hub_name]))
    hub_tensors = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{hub_name}/")}
    save_file(hub_tensors, d / "adapter.safetensors")
    return d


@pytest.mark.parametrize("hub_name", sorted(HUB))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapterhub_adapters_give_its_logits(tmp_path, arch, hub_name):
    base, x, tensors, hub_configs = hub_base(arch)
    # the fixture's base model is this base model (transformers 4.57 there, ours here)
    torch.testing.assert_close(logits(base, x), tensors["logits.base"], rtol=0, atol=1e-5)
    cfg = lf.BottleneckConfig.from_adapterhub(hub_configs[hub_name]["config"])
    assert cfg.placement == HUB[hub_name] and cfg.reduction_factor == 4
    hub_tensors = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{hub_name}/")}
    # our layout: AdapterHub's keys less ".adapters.<name>", one for one
    keys = adapterhub_keys(base, cfg, hub_name)
    assert sorted(keys.values()) == sorted(hub_tensors)
    assert all(
        ours == PREFIX + theirs.replace(f".adapters.{hub_name}.", ".") for ours, theirs in keys.items()
    )
    assert set(keys) == set(expected_shapes(base, cfg, find_targets(base, cfg)))
    expected = tensors[f"logits.{hub_name}"]
    assert (expected - tensors["logits.base"]).abs().max() > 1e-2
    # AdapterHub's directory, read as it is
    ours = load_adapterhub(copy.deepcopy(base), hub_dir(tmp_path, tensors, hub_configs, hub_name))
    assert lf.list_adapters(ours) == [hub_name]
    torch.testing.assert_close(logits(ours, x), expected, rtol=0, atol=1e-5)
    # and as a loraforge adapter directory: the same tensors under our keys
    lf.save_adapter(ours, tmp_path / "ours", adapter=hub_name)
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == keys.keys()
    assert all(torch.equal(saved[k], hub_tensors[keys[k]]) for k in keys)
    again = lf.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(again, x), expected, rtol=0, atol=1e-5)


def test_adapterhub_configs_loraforge_cannot_build_are_refused(tmp_path):
    base, _, tensors, hub_configs = hub_base("llama")
    pfeiffer = hub_configs["seq_bn"]["config"]
    for change in ({"ln_after": True}, {"use_gating": True}, {"phm_layer": True}, {"scaling": "learned"}):
        with pytest.raises(ValueError, match="loraforge does not build"):
            lf.BottleneckConfig.from_adapterhub({**pfeiffer, **change})
    with pytest.raises(ValueError, match="none of seq_bn, double_seq_bn, par_bn"):
        lf.BottleneckConfig.from_adapterhub({**pfeiffer, "mh_adapter": True})
    d = hub_dir(tmp_path, tensors, hub_configs, "seq_bn")
    snap = snapshot(base)
    (d / "adapter_config.json").write_text(
        json.dumps({**hub_configs["seq_bn"], "config": {**pfeiffer, "ln_after": True}})
    )
    with pytest.raises(ValueError, match=r"adapter_config.json: loraforge does not build ln_after=True"):
        load_adapterhub(base, d)
    (d / "adapter_config.json").write_text(json.dumps(hub_configs["seq_bn"]))
    bad = load_file(d / "adapter.safetensors")
    key = "model.layers.1.output_adapters.adapters.seq_bn.adapter_up.bias"
    bad[key] = torch.full((17,), 0.5)
    save_file(bad, d / "adapter.safetensors")
    with pytest.raises(
        ValueError, match=r"adapter.safetensors: shape mismatch for 'model.layers.1.output_adapters"
    ):
        load_adapterhub(base, d)
    (d / "adapter.safetensors").unlink()
    (d / "pytorch_adapter.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="only pytorch_adapter.bin, a pickle"):
        load_adapterhub(base, d)
    _unchanged(base, snap)


# -- placement and maths ------------------------------------------------------------------------
def test_placements_wrap_the_right_modules_and_start_at_the_base(ids):
    base = tiny_llama()
    expected = logits(base, ids)
    where = {"houlsby": {"attention_adapters", "output_adapters"}, "pfeiffer": {"output_adapters"},
             "parallel": {"output_adapters"}}  # fmt: skip
    for placement, holders in where.items():
        m = lf.inject(copy.deepcopy(base), lf.BottleneckConfig(placement=placement, leave_out=[1]))
        found = {n for n, mod in m.named_modules() if isinstance(mod, BottleneckLayer)}
        assert found == {f"model.layers.0.{name}" for name in holders}
        # nothing is replaced: the attention / feed-forward modules get a hook
        assert [type(x) for x in m.model.layers[0].children()][:4] == [
            type(x) for x in base.model.layers[0].children()
        ]
        assert bool(m.model.layers[0].self_attn._forward_hooks) == (placement == "houlsby")
        assert bool(m.model.layers[0].post_attention_layernorm._forward_pre_hooks) == (placement != "houlsby")
        torch.testing.assert_close(logits(m, ids), expected, rtol=0, atol=0)  # up = 0 at the start
        layer = m.model.layers[0].output_adapters
        assert layer.adapter_down["default"][0].weight.shape == (2, 32)  # 32 // 16
        assert layer.adapter_down["default"][1].name == {"houlsby": "swish"}.get(placement, "relu")
        assert layer.scaling["default"] == (4.0 if placement == "parallel" else 1.0)


def test_maths_of_each_placement_on_one_block():
    """h + A(h), h + A(r + h), h + A(r) with r the input of the norm before the feed-forward."""
    m = tiny_llama()
    block = m.model.layers[0]
    r = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    h = block.mlp(block.post_attention_layernorm(r))
    for placement in ("houlsby", "pfeiffer", "parallel"):
        mm = lf.inject(
            copy.deepcopy(m),
            lf.BottleneckConfig(placement=placement, reduction_factor=4, scaling=0.5, non_linearity="tanh"),
        )
        randomize(mm)
        blk = mm.model.layers[0]
        with torch.no_grad():
            got = blk.mlp(blk.post_attention_layernorm(r))
            down, up = (
                blk.output_adapters.adapter_down["default"][0],
                blk.output_adapters.adapter_up["default"],
            )
            v = {"houlsby": h, "pfeiffer": r + h, "parallel": r}[placement]
            want = h + 0.5 * up(torch.tanh(down(v)))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="needs the residual stream"):
        mm.model.layers[0].mlp(r)  # (called without the norm before it)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_gradients_reach_only_the_adapter(ids, placement, build):
    m = build()
    for module in m.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    lf.inject(m, lf.BottleneckConfig(placement=placement, reduction_factor=8)).train()
    randomize(m)
    m(ids, labels=ids).loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert grads == trainable and grads
    assert all(".adapter_down." in n or ".adapter_up." in n for n in grads)
    assert any(n.endswith("adapter_down.default.0.bias") for n in grads)  # the adapter's biases train too
    per_holder = 4 * (2 if placement == "houlsby" else 1) * 2  # 4 tensors, holders per block, 2 blocks
    assert len(grads) == per_holder


# -- the rest of the API --------------------------------------------------------------------
def test_merge_is_refused_clearly_and_nothing_changes(ids):
    m = lf.inject(tiny_llama(), lf.BottleneckConfig())
    randomize(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for call in (lf.merge, lf.merge_and_unload):
        with pytest.raises(
            ValueError, match="cannot merge.*bottleneck adapters cannot be merged.*nonlinearity"
        ):
            call(m)
    assert lf.merged_adapters(m) == []
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_switch_disable_delete_unload(ids):
    base = tiny_llama()
    plain = logits(base, ids)
    m = lf.inject(copy.deepcopy(base), lf.BottleneckConfig(placement="pfeiffer"), adapter="p")
    lf.add_adapter(m, "h", lf.BottleneckConfig(placement="houlsby", init_weights="bert"))
    randomize(m)
    out_p = logits(m, ids)
    lf.set_adapter(m, "h")
    out_h = logits(m, ids)
    assert (out_p - out_h).abs().max() > 1e-2 and (out_p - plain).abs().max() > 1e-2
    assert all(p.requires_grad == (".h." in n) for n, p in m.named_parameters())
    with lf.disable_adapters(m):
        torch.testing.assert_close(logits(m, ids), plain, rtol=0, atol=0)
    lf.set_adapter(m, ["p", "h"])  # stacked: each adapter sees the previous one's output
    both = logits(m, ids)
    assert (both - out_h).abs().max() > 1e-3
    lf.delete_adapter(m, "h")
    assert not hasattr(m.model.layers[0], "attention_adapters")  # only h was there
    assert not m.model.layers[0].self_attn._forward_hooks
    torch.testing.assert_close(logits(m, ids), out_p, rtol=0, atol=0)
    lf.unload(m)
    assert [type(x) for x in m.modules()] == [type(x) for x in base.modules()]
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())  # hooks gone
    torch.testing.assert_close(logits(m, ids), plain, rtol=0, atol=0)


def test_mixed_batch_equals_per_adapter_runs(ids):
    m = lf.inject(tiny_gpt2(), lf.BottleneckConfig(placement="parallel"), adapter="a")
    lf.add_adapter(m, "b", lf.BottleneckConfig(placement="houlsby", reduction_factor=8))
    randomize(m)
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


def test_deepcopy_follows_the_stream_hooks(ids):
    m = lf.inject(tiny_llama(), lf.BottleneckConfig(placement="parallel"))
    randomize(m)
    twin = copy.deepcopy(m)
    expected = logits(m, ids)
    torch.testing.assert_close(logits(twin, ids), expected, rtol=0, atol=0)
    randomize(m, seed=2)  # the copy has its own adapter and hooks
    torch.testing.assert_close(logits(twin, ids), expected, rtol=0, atol=0)


def test_half_precision_model_keeps_fp32_adapters(ids):
    m = lf.inject(tiny_llama().to(torch.bfloat16), lf.BottleneckConfig())
    layer = m.model.layers[0].output_adapters
    assert layer.adapter_up["default"].weight.dtype == torch.float32
    assert logits(m, ids).dtype == torch.bfloat16


# -- files ------------------------------------------------------------------------------------
def test_files_roundtrip_and_layout(tmp_path, ids):
    base = tiny_gpt2()
    m = lf.inject(
        copy.deepcopy(base),
        lf.BottleneckConfig(placement="houlsby", reduction_factor=8, non_linearity="gelu", dropout=0.1),
        adapter="x",
    )
    randomize(m)
    lf.save_adapter(m, tmp_path, adapter="x")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.1.attention_adapters.adapter_down.0.weight"].shape == (
        4,
        32,
    )
    assert tensors["base_model.model.transformer.h.1.output_adapters.adapter_up.bias"].shape == (32,)
    assert len(tensors) == 16
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "BOTTLENECK" and cfg["placement"] == "houlsby" and cfg["non_linearity"] == "gelu"
    )
    loaded = lf.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(m, ids), rtol=0, atol=0)
    assert lf.BottleneckConfig.from_peft_dict(cfg) == lf.BottleneckConfig(
        placement="houlsby", reduction_factor=8, non_linearity="gelu", dropout=0.1
    )


def _unchanged(model, snap):
    assert_unchanged(model, snap)
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in model.modules())


@pytest.mark.parametrize(
    "damage", ["reduction", "nan", "missing", "placement", "unknown_key", "nonlinearity"]
)
def test_bad_files_are_refused_and_model_untouched(tmp_path, damage):
    m = lf.inject(tiny_llama(), lf.BottleneckConfig(placement="parallel"))
    lf.save_adapter(m, tmp_path)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors, cfg = load_file(weights), json.loads(config.read_text())
    key = "base_model.model.model.layers.0.output_adapters.adapter_down.0.weight"
    expect = {
        "reduction": r"output_adapters.adapter_down.0.weight': file has \(2, 32\), model expects \(4, 32\)",
        "nan": "NaN/Inf",
        "missing": "is missing",
        "placement": "placement must be one of",
        "unknown_key": r"unknown config key\(s\) ln_after=True",
        "nonlinearity": "non_linearity must be one of",
    }[damage]
    if damage == "reduction":
        cfg["reduction_factor"] = 8
    elif damage == "nan":
        tensors[key][0, 0] = float("inf")
    elif damage == "missing":
        del tensors[key]
    elif damage == "placement":
        cfg["placement"] = "sideways"
    elif damage == "unknown_key":
        cfg["ln_after"] = True
    else:
        cfg["non_linearity"] = "softplus"
    save_file(tensors, weights)
    config.write_text(json.dumps(cfg))
    fresh = tiny_llama()
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=expect) as e:
        lf.load_adapter(fresh, tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    _unchanged(fresh, snap)


def test_config_validation():
    with pytest.raises(
        ValueError, match=r"unknown bottleneck config key 'reduction' \(did you mean 'reduction_factor'"
    ):
        lf.BottleneckConfig.from_dict({"reduction": 8})
    with pytest.raises(ValueError, match="reduction_factor must be a positive number"):
        lf.BottleneckConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="leave_out must be a list of block indices"):
        lf.BottleneckConfig(leave_out=[-1])
    with pytest.raises(
        ValueError, match=r"leave_out: block\(s\) \[5\] do not exist; the model has blocks 0-1"
    ):
        lf.inject(tiny_llama(), lf.BottleneckConfig(leave_out=[5]))
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        lf.inject(nn.Sequential(nn.Linear(4, 4)), lf.BottleneckConfig())
    cfg = lf.BottleneckConfig.from_dict({"placement": "houlsby", "non_linearity": "ReLU"})
    assert cfg.non_linearity == "relu" and lf.BottleneckConfig(**cfg.to_dict()) == cfg


# -- beside other methods -----------------------------------------------------------------------
@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_ia3_inside_adapted_modules_keep_their_paths(tmp_path, ids, lora_first):
    base = tiny_llama()
    lora = lf.LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    bottleneck = lf.BottleneckConfig(placement="houlsby", init_weights="bert")
    ia3 = lf.IA3Config(target_modules=["v_proj"], feedforward_modules=[], init_ia3_weights=False)
    m = copy.deepcopy(base)
    order = (
        [("lora", lora), ("bn", bottleneck), ("ia3", ia3)]
        if lora_first
        else [("bn", bottleneck), ("ia3", ia3), ("lora", lora)]
    )
    for name, cfg in order:
        lf.inject(m, cfg, adapter=name)
    randomize_lora(m)
    lf.set_adapter(m, ["lora", "bn", "ia3"])
    assert isinstance(m.model.layers[0].self_attn.q_proj, LoraLayer)  # (not under a wrapper)
    out = logits(m, ids)
    parts = {}
    for name in ("lora", "bn", "ia3"):
        lf.save_adapter(m, tmp_path / name, adapter=name)
        parts[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in parts["lora"]  # PEFT's keys
    assert "base_model.model.model.layers.0.self_attn.v_proj.ia3_l" in parts["ia3"]
    fresh = copy.deepcopy(base)
    for name in ("bn", "lora", "ia3"):
        lf.load_adapter(fresh, tmp_path / name, adapter=name)
    lf.set_adapter(fresh, ["lora", "bn", "ia3"])
    torch.testing.assert_close(logits(fresh, ids), out, rtol=0, atol=1e-5)
    lf.delete_adapter(m, "bn")
    lf.unload(m)
    assert [type(x) for x in m.modules()] == [type(x) for x in base.modules()]
    torch.testing.assert_close(logits(m, ids), logits(base, ids), rtol=0, atol=0)


def test_on_a_4bit_base(ids):
    from loraforge.quant import QuantConfig

    m = lf.quantize(tiny_llama(), QuantConfig(compute_dtype=torch.float32))
    plain = logits(m, ids)
    lf.inject(m, lf.BottleneckConfig(placement="parallel")).train()
    assert m.model.layers[0].output_adapters.adapter_up["default"].weight.dtype == torch.float32
    torch.testing.assert_close(logits(m, ids), plain, rtol=0, atol=0)
    randomize(m)
    m(ids, labels=ids).loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all(".output_adapters." in n for n in grads)


def test_a_load_failing_after_injection_is_rolled_back(tmp_path, ids, monkeypatch):
    import loraforge.adapter_files as files

    m = lf.inject(tiny_llama(), lf.BottleneckConfig(placement="parallel"), adapter="a")
    randomize(m)
    lf.save_adapter(lf.inject(tiny_llama(), lf.BottleneckConfig(placement="houlsby")), tmp_path)
    expected, snap = logits(m, ids), snapshot(m)
    hooks = {
        name: (dict(mod._forward_hooks), dict(mod._forward_pre_hooks)) for name, mod in m.named_modules()
    }

    def boom(*args, **kwargs):
        raise ValueError("disk trouble")

    monkeypatch.setattr(files, "_copy_in", boom)
    with pytest.raises(ValueError, match="disk trouble"):
        lf.load_adapter(m, tmp_path, adapter="b")
    state, types = snap
    assert [type(x) for x in m.modules()] == types and lf.list_adapters(m) == ["a"]
    assert m.state_dict().keys() == state.keys() and all(
        torch.equal(v, state[k]) for k, v in m.state_dict().items()
    )
    assert {
        name: (dict(mod._forward_hooks), dict(mod._forward_pre_hooks)) for name, mod in m.named_modules()
    } == hooks
    assert not hasattr(m.model.layers[0], "attention_adapters")
    torch.testing.assert_close(logits(m, ids), expected, rtol=0, atol=0)
