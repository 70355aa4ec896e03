"""One owner per concept (issue 15, items 1 and 2): the adapter registry is the only holder of
configs / targets / the active list; each wrapper class says its own factor shapes; one
predicate answers "is this 4-bit?" and one "is this GPT-2 Conv1D?"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraforge as lf
from loraforge.injection import count_parameters
from loraforge.kinds import is_4bit, is_conv1d
from loraforge.layers import LoraConv2d, LoraLayer, LoraLinear, wrapper_class
from loraforge.quant.linear4bit import is_quantizable
from loraforge.registry import AdapterRegistry, registry

SRC = Path(lf.__file__).parent


class Net(nn.Module):
    """One base layer of each kind a wrapper exists for (the 4-bit one is quantized in place)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 16)
        self.c1d = Conv1D(10, 16)  # weight stored (in=16, out=10)
        self.q4 = lf.Linear4bit.from_linear(nn.Linear(10, 8))
        self.conv = nn.Conv2d(2, 3, (3, 2))


TARGETS = ["emb", "lin", "c1d", "q4", "conv"]


# -- item 1: the registry ---------------------------------------------------------------------------
def test_adapter_state_lives_in_one_registry():
    m = tiny_llama()
    lf.inject(m, lf.LoraConfig(r=4, target_modules=["q_proj"]), adapter="a")
    lf.add_adapter(m, "b", lf.LoraConfig(r=2, target_modules=["v_proj"]))
    reg = registry(m)
    assert isinstance(reg, AdapterRegistry) and registry(m) is reg
    assert [k for k in vars(m) if k.startswith("_lf")] == ["_lf_registry"]  # one attribute
    assert reg.names == ["a", "b"] and reg.active == ["a"] and lf.list_adapters(m) == ["a", "b"]
    assert reg.targets["b"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    assert reg.configs["a"].r == 4
    lf.set_adapter(m, ["b", "a"])
    assert reg.active == ["b", "a"]
    lf.delete_adapter(m, "b")
    assert reg.names == ["a"] and reg.active == ["a"] and "b" not in reg.targets
    lf.unload(m)
    assert not any(k.startswith("_lf") for k in vars(m))  # nothing left behind
    assert registry(m).names == []


def test_check_known_names_the_known_adapters():
    reg = AdapterRegistry()
    with pytest.raises(ValueError, match="no LoRA adapter"):
        reg.check_known("x")
    reg.add("a", lf.LoraConfig(r=2, target_modules=["q"]), ["q"])
    reg.add("b", lf.LoraConfig(r=2, target_modules=["q"]), ["q"])
    assert reg.active == ["a"]  # the first added is active
    assert reg.check_known("b") == ["b"] and reg.check_known(["__base__", "a"], allow_base=True)
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['z'\]; known adapters: \['a', 'b'\]"):
        reg.check_known(["a", "z"])
    with pytest.raises(KeyError, match="__base__"):
        reg.check_known("__base__")


def test_snapshot_restore_is_independent_of_later_changes():
    reg = AdapterRegistry()
    reg.add("a", lf.LoraConfig(r=2, target_modules=["q"]), ["q"])
    snap = reg.snapshot()
    reg.add("b", lf.LoraConfig(r=2, target_modules=["k"]), ["k"])
    reg.targets["a"].append("k")
    reg.activate(["b"])
    assert snap.names == ["a"] and snap.targets == {"a": ["q"]} and snap.active == ["a"]
    reg.restore(snap)
    assert reg == snap and reg.targets["a"] is not snap.targets["a"]
    reg.remove("a")
    reg.restore(snap)  # a snapshot can be restored again
    assert reg.names == ["a"] and reg.active == ["a"]


def test_failed_load_restores_the_registry(tmp_path):
    m = tiny_llama()
    lf.inject(m, lf.LoraConfig(r=4, target_modules=["q_proj"]), adapter="a")
    lf.save_adapter(m, tmp_path, adapter="a")
    before = repr(registry(m))
    lf.load_adapter(m, tmp_path, adapter="b")
    assert registry(m).names == ["a", "b"]
    lf.delete_adapter(m, "b")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.float64) * 1e300  # overflows float32 while copying in
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="overflows"):
        lf.load_adapter(m, tmp_path, adapter="b")
    assert repr(registry(m)) == before


def test_modules_share_no_private_names():
    """The adapter modules call each other through public names only."""
    owned = [
        "injection.py",
        "adapters.py",
        "adapter_files.py",
        "registry.py",
        "kinds.py",
        *(f"layers/{p.name}" for p in (SRC / "layers").glob("*.py")),
    ]
    bad = []
    for rel in owned:
        for node in ast.walk(ast.parse((SRC / rel).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                bad += [f"{rel}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad


# -- item 2: layer shapes and kinds -----------------------------------------------------------------
def test_each_wrapper_knows_its_factor_shapes():
    net = Net()
    lf.inject(net, lf.LoraConfig(r=3, target_modules=TARGETS))
    kinds = {}
    for path, layer in ((p, m) for p, m in net.named_modules() if isinstance(m, LoraLayer)):
        kinds[path] = type(layer).__name__
        assert wrapper_class(layer.base_layer) is type(layer)
        live = {
            k.replace(".default", ""): tuple(v.shape) for k, v in layer.named_parameters() if ".default" in k
        }
        assert type(layer).factor_shapes(layer.base_layer, 3) == live, path
    assert kinds == {
        "emb": "LoraEmbedding",
        "lin": "LoraLinear",
        "c1d": "LoraLinear",
        "q4": "LoraLinear",
        "conv": "LoraConv2d",
    }
    assert LoraLinear.factor_shapes(net.c1d.base_layer, 5) == {
        "lora_A.weight": (5, 16),
        "lora_B.weight": (10, 5),
    }
    assert LoraConv2d.factor_shapes(net.conv.base_layer, 5)["lora_A.weight"] == (5, 2, 3, 2)


def test_load_asks_the_wrapper_for_shapes(tmp_path, monkeypatch):
    net = Net()
    lf.inject(net, lf.LoraConfig(r=3, target_modules=TARGETS))
    lf.save_adapter(net, tmp_path)
    lf.load_adapter(Net(), tmp_path)  # the shapes agree
    real = LoraLinear.factor_shapes.__func__
    monkeypatch.setattr(
        LoraLinear,
        "factor_shapes",
        classmethod(lambda cls, base, r: {k: (v[0] + 1, *v[1:]) for k, v in real(cls, base, r).items()}),
    )
    with pytest.raises(ValueError, match=r"shape mismatch for 'lin\.lora_A\.weight'"):
        lf.load_adapter(Net(), tmp_path)


def test_one_predicate_per_kind():
    lin, c1d, q4 = nn.Linear(4, 4), Conv1D(4, 4), lf.Linear4bit.from_linear(nn.Linear(8, 4))

    class Conv1D_(nn.Linear):  # named like GPT-2's but not one (no `nf`)
        pass

    Conv1D_.__name__ = "Conv1D"
    half = nn.Module()  # packed-looking bytes and a quant_state, but no dequantize(): not 4-bit
    half.weight = nn.Parameter(torch.zeros(10, dtype=torch.uint8), requires_grad=False)
    half.quant_state = None
    assert [is_conv1d(m) for m in (lin, c1d, q4, Conv1D_(2, 2))] == [False, True, False, False]
    assert [is_4bit(m) for m in (lin, c1d, q4, half)] == [False, False, True, False]
    # quantize() takes what the layers call linear: nn.Linear and the one Conv1D predicate
    assert [is_quantizable(m) for m in (lin, c1d, nn.Embedding(2, 2))] == [True, True, False]
    assert is_quantizable(Conv1D_(2, 2))  # (an nn.Linear subclass), and a bare imposter is not linear:
    imposter = type("Conv1D", (nn.Module,), {})()
    assert not is_conv1d(imposter) and not is_quantizable(imposter)
    # count_parameters counts 2 values per packed byte only where the predicate says 4-bit
    assert count_parameters(half)[1] == 10 and count_parameters(q4)[1] == 32 + 4


def test_no_other_way_to_recognise_a_kind():
    """The class-name, module-name and attribute probes live in ``kinds.py`` only."""
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "hasattr"
                and len(node.args) == 2
            ):
                arg = node.args[1]
                if isinstance(arg, ast.Constant) and arg.value in ("quant_state", "dequantize", "nf"):
                    found.append(f"{rel}: hasattr {arg.value}")
            if isinstance(node, ast.Compare):
                for c in (node.left, *node.comparators):
                    if isinstance(c, ast.Constant) and c.value in (
                        "Conv1D",
                        "Linear4bit",
                        "loraforge.quant.linear4bit",
                    ):
                        found.append(f"{rel}: == {c.value!r}")
    assert all(f.startswith("kinds.py:") for f in found), found
