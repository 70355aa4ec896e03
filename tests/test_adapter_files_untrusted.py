"""Adapter files as untrusted input: bad values and types refused with one line naming the file,
and a failed load leaves the model exactly as it was (modules, weights, flags, adapters)."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch
from conftest import logits, randomize_lora, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import loraforge as lf
import loraforge.adapter_files as lfio
from loraforge.layers import LoraLayer, ModulesToSave
from loraforge.registry import registry

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
lfinject = importlib.import_module("loraforge.injection")  # (lf.inject is the function)
HOLDERS = (LoraLayer, ModulesToSave)
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _save(directory, model=None, **cfg):
    cfg = {"r": 4, "alpha": 8, "target_modules": ["q_proj"], **cfg}
    m = lf.inject(model if model is not None else tiny_llama(), lf.LoraConfig(**cfg))
    randomize_lora(m)
    lf.save_adapter(m, directory)
    return directory


def _edit_config(directory, drop=(), **updates):
    cfg = json.loads((directory / CONFIG).read_text())
    cfg.update(updates)
    for key in drop:
        del cfg[key]
    (directory / CONFIG).write_text(json.dumps(cfg))  # NaN / Infinity written as Python's json does


def _edit_tensors(directory, edit):
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)


def _state(model):
    """Everything a load may touch: structure, values, flags, adapters, each layer's active list."""
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "registry": repr(registry(model)),
        "active": [(n, list(m.active_adapters)) for n, m in model.named_modules() if isinstance(m, HOLDERS)],
        "training": [m.training for m in model.modules()],
    }


def _assert_same(model, before):
    now = _state(model)
    assert now["modules"] == before["modules"]
    assert now["values"].keys() == before["values"].keys()
    for k, v in before["values"].items():
        assert torch.equal(now["values"][k], v), k
    for key in ("flags", "registry", "active", "training"):
        assert now[key] == before[key], key


def _refused(model, directory, match, **kw):
    """Load must raise one line that names the directory and ``match``, changing nothing."""
    before = _state(model)
    with pytest.raises(ValueError, match=match) as e:
        lf.load_adapter(model, directory, **kw)
    msg = str(e.value)
    assert str(directory) in msg and "\n" not in msg, msg
    _assert_same(model, before)
    return msg


# -- tensor values (item 2) ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_factors_are_refused_unless_allowed(tmp_path, bad):
    d = _save(tmp_path / "ad")
    _edit_tensors(d, lambda t: t[Q_A].view(-1).__setitem__(3, bad))
    msg = _refused(tiny_llama(), d, "NaN/Inf")
    assert WEIGHTS in msg and Q_A in msg and "allow_nonfinite=True" in msg
    m = lf.load_adapter(tiny_llama(), d, allow_nonfinite=True)  # the documented escape
    a = m.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert not torch.isfinite(a).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn])
def test_non_float_tensors_are_refused_not_cast(tmp_path, dtype):
    d = _save(tmp_path / "ad")
    _edit_tensors(d, lambda t: t.__setitem__(Q_A, t[Q_A].to(dtype)))
    msg = _refused(tiny_llama(), d, "must be float16, bfloat16, float32 or float64")
    assert Q_A in msg and str(dtype).removeprefix("torch.") in msg


def test_value_that_overflows_the_models_dtype_is_refused(tmp_path):
    # fp32 file, fp16 model: the factors stay fp32 (no overflow), but biases land in fp16.
    d = _save(tmp_path / "ad", model=tiny_gpt2(), target_modules=["c_attn"], bias="all")
    key = "base_model.model.transformer.h.0.mlp.c_fc.bias"
    _edit_tensors(d, lambda t: t[key].view(-1).__setitem__(0, 1e6))
    half = tiny_gpt2().half()
    msg = _refused(half, d, "overflows float16")
    assert key in msg and "1e+06" in msg
    fine = tiny_gpt2()  # in fp32 the same file is fine
    lf.load_adapter(fine, d)
    assert fine.transformer.h[0].mlp.c_fc.bias[0] == 1e6


def test_nan_adapter_is_refused_by_merge_cli(tmp_path, capsys):
    from loraforge.cli import main
    from loraforge.training.builtin import build_model

    d = _save(tmp_path / "ad", model=build_model("builtin:tiny-llama"))
    _edit_tensors(d, lambda t: t[Q_A].view(-1).__setitem__(0, float("nan")))
    out = tmp_path / "merged"
    assert main(["merge", "--base", "builtin:tiny-llama", "--adapter", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and Q_A in err and not out.exists()


# -- config values (items 2 and 16) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "updates, drop, match",
    [
        ({"use_rslora": "no"}, (), "use_rslora must be true or false, got 'no'"),
        ({"fan_in_fan_out": 0}, (), "fan_in_fan_out must be true or false"),
        ({"lora_alpha": float("nan")}, (), "lora_alpha must be a positive finite number, got nan"),
        ({"lora_alpha": float("inf")}, (), "lora_alpha must be a positive finite number, got inf"),
        ({"lora_alpha": "16"}, (), "lora_alpha must be a positive finite number"),
        ({"lora_dropout": float("nan")}, (), "lora_dropout must be in"),
        ({"r": 4.0}, (), "r must be a positive integer, got 4.0"),
        ({"r": True}, (), "r must be a positive integer, got True"),
        ({}, ("r",), "required key 'r' .* is missing"),
        ({"rank_pattern": {"q_proj(": 2}}, (), r"rank_pattern key 'q_proj\(' is not a valid regex"),
        ({"alpha_pattern": {"[q": 2.0}}, (), r"alpha_pattern key '\[q' is not a valid regex"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, (), "alpha_pattern.*positive finite number"),
        ({"rank_pattern": {"q_proj": 2.5}}, (), "rank_pattern.*positive integer"),
        ({"layers_to_transform": [0.5]}, (), "layers_to_transform must be"),
        ({"modules_to_save": "lm_head"}, (), "modules_to_save must be a list"),
        ({"inference_mode": "yes"}, (), "inference_mode must be true or false"),
        ({"init_lora_weights": "corda"}, (), "init_lora_weights='corda' is not supported"),
        ({"init_lora_weights": "no"}, (), "init_lora_weights='no' is not supported"),
        ({"foo_config": {"x": 1}}, (), "unknown config key.*foo_config"),
        ({"use_dora": "yes"}, (), "use_dora must be true or false"),
    ],
)
def test_config_values_are_type_checked(tmp_path, updates, drop, match):
    d = _save(tmp_path / "ad")
    _edit_config(d, drop=drop, **updates)
    msg = _refused(tiny_llama(), d, match)
    assert CONFIG in msg
    assert "shape mismatch" not in msg and "another base model" not in msg


@pytest.mark.parametrize("value", [None, False, {}, []])
def test_unknown_keys_that_are_off_warn_and_load(tmp_path, ids, value):
    d = _save(tmp_path / "ad")
    reference = logits(lf.load_adapter(tiny_llama(), d), ids)
    _edit_config(d, foo_config=value)
    with pytest.warns(UserWarning, match=r"ignoring unknown key\(s\) \['foo_config'\]"):
        m = lf.load_adapter(tiny_llama(), d)
    torch.testing.assert_close(logits(m, ids), reference, rtol=0, atol=0)


def test_peft_defaults_load_without_warning(tmp_path):
    d = _save(tmp_path / "ad")
    _edit_config(d, init_lora_weights=False, use_dora=False, inference_mode=False, eva_config=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.load_adapter(tiny_llama(), d)


# -- broken files (item 16) ------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 7, 60, "half"])
def test_truncated_safetensors_is_one_clear_line(tmp_path, keep):
    d = _save(tmp_path / "ad")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    msg = _refused(tiny_llama(), d, "is not a readable safetensors file")
    assert str(d / WEIGHTS) in msg


@pytest.mark.parametrize("with_config", [True, False])
def test_pickle_only_folder_is_refused(tmp_path, with_config):
    d = _save(tmp_path / "ad")
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    if not with_config:
        (d / CONFIG).unlink()
    msg = _refused(tiny_llama(), d, "only safetensors are read")
    assert "found adapter_model.bin" in msg


def test_unreadable_json_message(tmp_path):
    d = _save(tmp_path / "ad")
    (d / CONFIG).write_text('{"r": 4, "bias": "no\tne"}')  # a raw tab inside a string
    msg = _refused(tiny_llama(), d, "invalid JSON")
    assert "at at" not in msg and str(d / CONFIG) in msg


# -- rollback (item 14) ----------------------------------------------------------------------------


def _without(*suffixes):
    def edit(tensors):
        for k in [k for k in tensors if k.endswith(suffixes)]:
            del tensors[k]

    return edit


def test_failed_bias_all_load_restores_trainable_biases(tmp_path):
    d = _save(tmp_path / "ad", model=tiny_gpt2(), target_modules=["c_attn"], bias="all")
    _edit_tensors(d, _without("ln_f.bias", "c_fc.bias"))
    model = tiny_gpt2()
    assert all(p.requires_grad for p in model.parameters())
    msg = _refused(model, d, "lacks tensors its config implies")
    assert "ln_f.bias" in msg and str(d / WEIGHTS) in msg
    assert all(p.requires_grad for p in model.parameters())


def test_failed_load_next_to_existing_adapters_restores_them(tmp_path):
    d = _save(tmp_path / "ad", model=tiny_gpt2(), target_modules=["c_attn", "c_fc"], bias="all")
    _edit_tensors(d, _without("ln_f.bias"))
    m = lf.inject(tiny_gpt2(), lf.LoraConfig(r=2, target_modules=["c_attn", "c_proj"]), adapter="a")
    lf.add_adapter(m, "b", lf.LoraConfig(r=2, target_modules=["c_attn"]))
    lf.set_adapter(m, "b")
    m.transformer.wte.weight.requires_grad_(True)  # a flag the user set by hand survives too
    _refused(m, d, "lacks tensors")
    assert lf.list_adapters(m) == ["a", "b"]


def test_failed_pissa_load_puts_base_weights_back(tmp_path):
    d = _save(tmp_path / "ad", model=tiny_gpt2(), target_modules=["c_attn"], bias="all", init="pissa")
    _edit_tensors(d, _without("ln_f.bias"))
    assert json.loads((d / CONFIG).read_text())["init_lora_weights"] == "pissa"
    _refused(tiny_gpt2(), d, "lacks tensors")  # injecting moved W0's top part: moved back


@pytest.mark.parametrize("fail_at", ["second wrap", "copy in"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_any_failure_inside_a_load_is_rolled_back(tmp_path, monkeypatch, fail_at, error):
    d = _save(tmp_path / "ad", target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = tiny_llama()
    before = _state(model)
    if fail_at == "copy in":

        def boom(*args):
            raise error("injected failure")

        monkeypatch.setattr(lfio, "_copy_in", boom)
    else:
        real, calls = lfinject.wrap, []

        def boom(module):
            calls.append(module)
            if len(calls) == 2:
                raise error("injected failure")
            return real(module)

        monkeypatch.setattr(lfinject, "wrap", boom)
    with pytest.raises(error, match="injected failure"):
        lf.load_adapter(model, d)
    _assert_same(model, before)
    monkeypatch.undo()
    lf.load_adapter(model, d)  # and the model still takes the adapter afterwards
    assert lf.list_adapters(model) == ["default"]


def test_refused_before_any_change_on_an_adapted_model(tmp_path):
    d = _save(tmp_path / "ad")
    _edit_tensors(d, lambda t: t[Q_A].view(-1).__setitem__(0, float("nan")))
    m = lf.inject(tiny_llama(), lf.LoraConfig(r=2, target_modules=["q_proj"]), adapter="first")
    _refused(m, d, "NaN/Inf")


class _WithBuffers(torch.nn.Module):
    """A target layer and a saved module with an integer buffer (BatchNorm's step counter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        return self.norm(self.lin(x))


def test_integer_buffers_of_saved_modules_load_as_they_are(tmp_path):
    m = lf.inject(_WithBuffers(), lf.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["norm"]))
    m.norm.modules_to_save["default"].num_batches_tracked.fill_(5)
    lf.save_adapter(m, tmp_path / "ad")
    loaded = lf.load_adapter(_WithBuffers(), tmp_path / "ad")
    assert loaded.norm.modules_to_save["default"].num_batches_tracked.item() == 5
    key = "base_model.model.norm.num_batches_tracked"
    _edit_tensors(tmp_path / "ad", lambda t: t.__setitem__(key, t[key].float()))
    msg = _refused(_WithBuffers(), tmp_path / "ad", "is float32; the model's is int64")
    assert key in msg
