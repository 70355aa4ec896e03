"""4-bit checkpoints are untrusted input: no file content may crash the process or read past a buffer.

Crafted bitsandbytes-format checkpoints (bad block sizes, lengths, shapes, dtypes, NaN scales) go
through the real loading path, ``lf.load_model``; each must raise a ``ValueError`` naming the
file and the tensor or JSON field. Where a missing check would make the C kernel read or write
out of bounds (a segfault would end pytest), the case runs in a child process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import loraforge as lf
from loraforge.quant import QuantState, _native, dequantize_4bit, quantize_4bit

from .util import tiny_llama

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None,
    reason="no C compiler on this machine: the C kernel is not used",
)

LAYER = "model.layers.0.mlp.up_proj.weight"  # (128, 64): 8192 weights, 128 blocks of 64
BLOB = LAYER + ".quant_state.bitsandbytes__nf4"


def _json_field(**fields):
    def edit(sd):
        meta = json.loads(bytes(sd[BLOB].numpy()))
        meta.update(fields)
        sd[BLOB] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)

    return edit


def _set(key, value):
    def edit(sd):
        sd[f"{LAYER}.{key}"] = value(sd[f"{LAYER}.{key}"]) if callable(value) else value

    return edit


def _nan_at(key, i=3):
    def edit(sd):
        sd[f"{LAYER}.{key}"] = sd[f"{LAYER}.{key}"].clone()
        sd[f"{LAYER}.{key}"][i] = float("nan")

    return edit


def _both(*edits):
    def edit(sd):
        for e in edits:
            e(sd)

    return edit


F, T = re.escape(BLOB), re.escape(LAYER)  # the JSON blob's and the weight's keys, as regexes

# (case, base: "dq" double-quantized | "plain", edit of the state dict, the message after "<file>: ")
CASES = [
    ("nested_blocksize_negative_empty_nested", "dq",
     _both(_json_field(nested_blocksize=-1000), _set("nested_absmax", torch.empty(0))),
     rf"{F}: field 'nested_blocksize' must be one of 32, .*; got -1000"),
    ("nested_blocksize_zero", "dq", _json_field(nested_blocksize=0),
     rf"{F}: field 'nested_blocksize' .*got 0"),
    ("nested_blocksize_fraction", "dq", _json_field(nested_blocksize=256.5),
     rf"{F}: field 'nested_blocksize' .*got 256\.5"),
    ("nested_absmax_empty", "dq", _set("nested_absmax", torch.empty(0)),
     rf"{T}\.nested_absmax: 0 values"),
    ("nested_absmax_nan", "dq", _nan_at("nested_absmax", 0),
     rf"{T}\.nested_absmax: non-finite value nan"),
    ("nested_quant_map_short", "dq", _set("nested_quant_map", lambda t: t[:255].clone()),
     rf"{T}\.nested_quant_map: expected 256"),
    ("nested_quant_map_nan", "dq", _nan_at("nested_quant_map"),
     rf"{T}\.nested_quant_map: non-finite"),
    ("nested_offset_string", "dq", _json_field(nested_offset="abc"),
     rf"{F}: field 'nested_offset' must be a number; got 'abc'"),
    ("nested_offset_nan", "dq", _json_field(nested_offset=float("nan")),
     rf"{F}: field 'nested_offset' must be finite; got nan"),
    ("nested_dtype_int", "dq", _json_field(nested_dtype="int32"),
     rf"{F}: field 'nested_dtype' must be a floating"),
    ("quant_map_nan", "dq", _nan_at("quant_map"),
     rf"{T}\.quant_map: non-finite value nan"),
    ("quant_map_2d", "dq", _set("quant_map", lambda t: t.reshape(4, 4).clone()),
     rf"{T}\.quant_map: expected 16"),
    ("dtype_int8", "dq", _json_field(dtype="int8"),
     rf"{F}: field 'dtype' must be one of float32, .*; got int8"),
    ("dtype_unknown", "dq", _json_field(dtype="float77"),
     rf"{F}: field 'dtype' must name a torch dtype"),
    ("shape_string", "dq", _json_field(shape="64x64"),
     rf"{F}: field 'shape' must be a list of positive integers; got '64x64'"),
    ("shape_negative", "dq", _json_field(shape=[-128, -64]),
     rf"{F}: field 'shape' must be a list of positive integers"),
    ("blocksize_odd", "dq", _json_field(blocksize=63),
     rf"{F}: field 'blocksize' must be one of .*; got 63"),
    ("blocksize_fraction", "dq", _json_field(blocksize=64.0),
     rf"{F}: field 'blocksize' .*; got 64\.0"),
    ("absmax_short", "plain", _set("absmax", lambda t: t[:10].clone()),
     rf"{T}\.absmax: 10 values, but .* needs 128"),
    ("absmax_inf", "plain", _set("absmax", lambda t: t.index_fill(0, torch.tensor([5]), math.inf)),
     rf"{T}\.absmax: non-finite value inf"),
    ("absmax_int", "plain", _set("absmax", lambda t: t.to(torch.int32)),
     rf"{T}\.absmax: torch\.int32, but no"),
    ("blob_not_bytes", "plain", lambda sd: sd.__setitem__(BLOB, sd[BLOB].float()),
     rf"{F}: expected the uint8 bytes of a JSON object"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two tiny Llamas saved by ``lf.save_model`` in bitsandbytes' 4-bit format: with double
    quantization ("dq") and without ("plain")."""
    root = tmp_path_factory.mktemp("untrusted")
    tiny_llama(seed=0).save_pretrained(root / "fp")
    for name, dq in (("dq", True), ("plain", False)):
        qc = lf.QuantConfig(compute_dtype=torch.float32, double_quant=dq)
        lf.save_model(lf.load_model(root / "fp", quantization=qc), root / name)
    return root


def _craft(bases, tmp_path, case, base, edit):
    from safetensors.torch import load_file, save_file

    out = tmp_path / case
    out.mkdir()
    shutil.copy(bases / base / "config.json", out / "config.json")
    sd = load_file(bases / base / "model.safetensors")
    edit(sd)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("case, base, edit, message", CASES, ids=[c[0] for c in CASES])
def test_crafted_checkpoint_is_refused_naming_file_and_field(
    bases, tmp_path, monkeypatch, case, base, edit, message
):
    """In process, on the PyTorch path (no C code runs, so nothing here can crash pytest)."""
    monkeypatch.setenv("LORAFORGE_NATIVE", "0")
    out = _craft(bases, tmp_path, case, base, edit)
    with pytest.raises(ValueError, match=re.escape(str(out / "model.safetensors")) + ": " + message):
        lf.load_model(out)


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import loraforge as lf
    from loraforge.quant import _native
    assert _native.kernel() is not None, _native.error()
    results = {}
    for d in sys.argv[1:]:
        try:
            lf.load_model(d)(torch.tensor([[1, 2, 3]]))  # load, then the first forward
            results[d] = "loaded and ran"
        except ValueError as e:
            results[d] = "ValueError: " + str(e)
    print(json.dumps(results))
    """
)


@needs_cc
def test_crafted_checkpoints_never_crash_with_the_c_kernel(bases, tmp_path):
    """Every crafted file loaded and run in a child process with the C kernel on: a segfault
    (before: a negative ``nested_blocksize`` with an empty ``nested_absmax``) would kill it."""
    dirs = [_craft(bases, tmp_path, case, base, edit) for case, base, edit, _ in CASES]
    env = {**os.environ, "LORAFORGE_NATIVE": "1"}
    cmd = [sys.executable, "-c", CHILD, *map(str, dirs)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"child died with {res.returncode}: {res.stderr[-2000:]}"
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for d, (case, _, _, message) in zip(dirs, CASES):
        file = re.escape(str(d / "model.safetensors"))
        assert re.match(f"ValueError: {file}: {message}", results[str(d)]), (case, results[str(d)])


def _state(double_quant=True, shape=(128, 64)):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return quantize_4bit(w, "nf4", 64, double_quant=double_quant)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(blocksize=0), "QuantState blocksize must be one of"),
        (dict(blocksize=64.0), "QuantState blocksize must be one of"),
        (dict(dtype=torch.int8), "QuantState dtype must be one of float32, float16, bfloat16"),
        (dict(shape=(64, 64)), r"QuantState absmax: 128 values, but shape \[64, 64\] .* needs 64"),
        (dict(shape=(0, 64)), "QuantState shape must be a list of positive integers"),
        (dict(quant_type="nf5"), "QuantState quant_type must be one of"),
        (dict(code=torch.zeros(15)), "QuantState quant_map: expected 16"),
        (dict(offset=torch.zeros(2)), "QuantState nested_offset must be a one-element float tensor"),
        (dict(absmax="abc"), "QuantState absmax: str values"),
    ],
)
def test_states_built_in_code_are_checked(change, message):
    """Construction checks the structure (O(1)) before any kernel can see the state."""
    _, s = _state()
    fields = dict(absmax=s.absmax, code=s.code, blocksize=s.blocksize, quant_type=s.quant_type, dtype=s.dtype,
                  shape=s.shape, offset=s.offset, state2=s.state2)  # fmt: skip
    with pytest.raises(ValueError, match=message):
        QuantState(**{**fields, **change})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(blocksize=-1000), "QuantState nested_blocksize must be one of"),
        (dict(blocksize=256.5), "QuantState nested_blocksize must be one of"),
        (dict(code=torch.zeros(16)), "QuantState nested_quant_map: expected 256"),
        (dict(absmax=torch.zeros(1, dtype=torch.uint8)), "QuantState nested_absmax: expected floating"),
    ],
)
def test_nested_states_are_checked(change, message):
    _, s = _state()
    s2 = s.state2
    fields = dict(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, quant_type=None, dtype=s2.dtype)
    with pytest.raises(ValueError, match=message):
        QuantState(**{**fields, **change})


def test_nested_absmax_length_is_checked_against_the_blocks():
    _, s = _state()
    short = QuantState(torch.empty(0), s.state2.code, 256, None, torch.float32)
    with pytest.raises(ValueError, match=r"QuantState nested_absmax: 0 values; 128 blocks .* need 1"):
        QuantState(s.absmax, s.code, 64, "nf4", torch.float32, s.shape, s.offset, short)


def test_quantized_states_pass_and_dequantize_as_before():
    """What quantize_4bit builds passes the checks (and a state read back equals it)."""
    for dq in (True, False):
        packed, s = _state(dq, (37, 96))
        s.validate()
        s.check_values()
        back = QuantState.from_tensors(s.as_tensors())
        assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, s))


KERNEL_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from loraforge.quant import _native, dequantize_4bit, quantize_4bit
    fns = {"native": _native.kernel(), "portable": _native.build(sys.argv[1], flag_sets=(("-O2",),))}
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=False)
    src, absmax, code = packed.reshape(-1), state.absmax, state.code
    out = torch.empty(w.numel())
    calls = {  # (packed, absmax, code, out, b0, b1, blocksize): each needs more than it is given
        "short absmax": (src, absmax[:10], code, out, 0, 128, 64),
        "short packed": (src[:100], absmax, code, out, 0, 128, 64),
        "short out": (src, absmax, code, out[:1000], 0, 128, 64),
        "short code": (src, absmax, code[:8], out, 0, 128, 64),
        "reversed range": (src, absmax, code, out, 5, 2, 64),
        "negative start": (src, absmax, code, out, -3, 2, 64),
        "zero block size": (src, absmax, code, out, 0, 128, 0),
        "negative block size": (src, absmax, code, out, 0, 2, -64),
    }
    results = {}
    for kind, fn in fns.items():
        for name, args in calls.items():
            try:
                _native.dequantize_blocks(*args, fn=fn)
                results[f"{kind} {name}"] = "ran"
            except ValueError as e:
                results[f"{kind} {name}"] = str(e)
        q = torch.zeros(128, dtype=torch.uint8)
        absmax_calls = {  # (q, code, nested, offset, nested blocksize)
            "empty nested": (q, torch.zeros(256), torch.empty(0), torch.tensor(0.0), 256),
            "negative nested blocksize": (q, torch.zeros(256), torch.ones(1), torch.tensor(0.0), -1000),
            "short nested code": (q, torch.zeros(16), torch.ones(1), torch.tensor(0.0), 256),
        }
        for name, args in absmax_calls.items():
            _native._state["fn"] = fn
            try:
                _native.dequantize_absmax(*args)
                results[f"{kind} {name}"] = "ran"
            except ValueError as e:
                results[f"{kind} {name}"] = str(e)
    # a state changed after it was checked: the C kernel still refuses
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    state.state2.absmax = torch.empty(0)
    try:
        dequantize_4bit(packed, state)
        results["changed state"] = "ran"
    except ValueError as e:
        results["changed state"] = str(e)
    print(json.dumps(results))
    """
)


@needs_cc
def test_c_kernels_refuse_sizes_that_do_not_fit(tmp_path):
    """The C entry points check the lengths they are given (O(1), before any access) and return an
    error code, raised here as ValueError; in a child process, where a read past a buffer could
    crash. Both the -march=native build and a portable one."""
    res = subprocess.run([sys.executable, "-c", KERNEL_CHILD, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, f"child died with {res.returncode}: {res.stderr[-2000:]}"
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * 11 + 1
    want = {
        "short absmax": "more block scales", "short packed": "more packed bytes",
        "short out": "longer output", "short code": "code table is too short",
        "reversed range": "negative or reversed",
        "negative start": "negative or reversed", "zero block size": "block size",
        "negative block size": "block size", "empty nested": "more nested scales",
        "negative nested blocksize": "block size", "short nested code": "code table is too short",
    }  # fmt: skip
    for key, text in results.items():
        assert "refused by the C kernel" in text, (key, text)
        assert key == "changed state" or want[key.split(" ", 1)[1]] in text, (key, text)


@needs_cc
def test_kernel_checks_keep_the_bits(monkeypatch):
    """The checked C entry points give the same bits as the PyTorch path (the sizes that fit)."""
    for dq in (True, False):
        packed, s = _state(dq, (300, 200))
        native = dequantize_4bit(packed, s, torch.bfloat16)
        monkeypatch.setenv("LORAFORGE_NATIVE", "0")
        eager = dequantize_4bit(packed, s, torch.bfloat16)
        monkeypatch.delenv("LORAFORGE_NATIVE")
        assert _native.kernel() is not None
        assert torch.equal(native.view(torch.int16), eager.view(torch.int16))
