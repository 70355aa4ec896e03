"""NF4/FP4 blockwise quantization on its own (no bitsandbytes needed): format, accuracy, storage, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import loraforge as lf
from loraforge.quant import QuantState, dequantize_4bit, quantize_4bit

NF4_FROM_FORMATS_MD = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_codebooks():
    assert lf.quant.get_code("nf4").tolist() == pytest.approx(NF4_FROM_FORMATS_MD, abs=0)
    fp4 = lf.quant.get_code("fp4")
    assert fp4.tolist()[:8] == pytest.approx([m / 12 for m in (0, 0.0625, 8, 12, 4, 6, 2, 3)], rel=1e-7)
    assert torch.equal(fp4[8:].abs(), fp4[:8]) and bool((fp4[9:] < 0).all())  # bit 3 is the sign
    dyn = lf.quant.dynamic_map()
    assert dyn.numel() == 256 and bool((dyn[1:] > dyn[:-1]).all())
    assert dyn[0].item() == pytest.approx(-0.99296875) and dyn[-1].item() == 1.0


def test_packing_layout_high_nibble_first():
    # one block [1, c_k ...]: element 2i -> high nibble, 2i+1 -> low nibble; an odd count is
    # padded with a 0.0 value, i.e. the nibble of code 0.0 (7 in NF4, 0 in FP4), as in bitsandbytes
    code = lf.quant.get_code("nf4")
    w = torch.cat([torch.ones(1), code[[0, 7, 3, 12]]])  # nibbles 15, 0, 7, 3, 12 (+ pad 7)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=False)
    assert packed.shape == (3, 1) and packed.dtype == torch.uint8
    assert packed.flatten().tolist() == [0xF0, 0x73, 0xC7]
    assert state.absmax.tolist() == [1.0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (65, 33), (4, 64 * 300 + 7)])
def test_roundtrip_error_is_bounded_by_half_the_code_gap(quant_type, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, quant_type, 64, double_quant=False)
    w_hat = dequantize_4bit(packed, state)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    code = lf.quant.get_code(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    flat = torch.nn.functional.pad(w.flatten(), (0, -w.numel() % 64))
    bound = flat.view(-1, 64).abs().amax(1).repeat_interleave(64)[: w.numel()] * half_gap
    assert bool(((w_hat - w).abs().flatten() <= bound + 1e-6).all())


def test_dequantize_dtypes_and_nested_state():
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    assert dequantize_4bit(packed, state).dtype == torch.bfloat16
    as_fp32 = dequantize_4bit(packed, state, torch.float32)
    assert torch.equal(dequantize_4bit(packed, state, torch.float16), as_fp32.half())
    assert torch.equal(dequantize_4bit(packed, state), as_fp32.bfloat16())  # rounded once, from fp32
    # double quantization changes the scales only slightly
    _, plain = quantize_4bit(w, "nf4", 64, double_quant=False)
    rel = (state.dequantize_absmax() - plain.absmax).abs() / plain.absmax
    assert rel.max().item() < 0.02


def test_bits_per_weight_is_4_127():
    """Storage of a 4096 x 4096 weight, NF4 + double quantization, blocksize 64, measured in bytes."""
    n = 4096 * 4096
    packed, state = quantize_4bit(torch.randn(4096, 4096), "nf4", 64, double_quant=True)
    stored = [packed, state.absmax, state.state2.absmax, state.offset]
    bits = sum(t.numel() * t.element_size() for t in stored) * 8 / n
    print(f"\nNF4 + double quant, blocksize 64: {bits:.4f} bits/weight (without double quant: {4 + 32 / 64})")
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert round(bits, 3) == 4.127


def test_quant_state_serialisation_roundtrip():
    w = torch.randn(33, 70)
    packed, state = quantize_4bit(w, "fp4", 128, double_quant=True)
    tensors = state.as_tensors()
    assert list(tensors) == [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state.bitsandbytes__fp4",
    ]
    meta = json.loads(bytes(tensors["quant_state.bitsandbytes__fp4"].numpy()))
    assert meta == {
        "quant_type": "fp4", "blocksize": 128, "dtype": "float32", "shape": [33, 70],
        "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": state.offset.item(),
    }  # fmt: skip
    back = QuantState.from_tensors(tensors)
    assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 100])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(64), "nf4", blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        lf.QuantConfig(blocksize=blocksize)


def test_bad_inputs():
    for dtype in (torch.int8, torch.uint8, torch.int64, torch.bool):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            quantize_4bit(torch.zeros(64, dtype=dtype))
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), "int4")
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(torch.randn(0))
    with pytest.raises(ValueError, match="compute_dtype"):
        lf.QuantConfig(compute_dtype=torch.int8)
    packed, state = quantize_4bit(torch.randn(10, 10))
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_4bit(packed[:-1], state)


def _state_tensors():
    _, state = quantize_4bit(torch.randn(8, 64))
    return state.as_tensors()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t.pop("absmax"), r"w\.absmax: missing"),
        (lambda t: t.pop("nested_absmax"), r"w\.nested_absmax: missing"),
        (lambda t: t.pop("quant_state.bitsandbytes__nf4"), r"w: expected one 'w\.quant_state"),
        (lambda t: t.__setitem__("absmax", t["absmax"][:3]), r"w\.absmax: 3 values"),
        (
            lambda t: t.__setitem__("absmax", t["absmax"].float()),
            r"w\.absmax: double-quantized absmax must be uint8",
        ),
        (lambda t: t.__setitem__("quant_map", t["quant_map"][:8]), r"w\.quant_map: expected 16"),
        (lambda t: t.__setitem__("nested_absmax", torch.ones(5)), r"w\.nested_absmax: 5 values"),
        (
            lambda t: t.__setitem__(
                "quant_state.bitsandbytes__nf4", torch.tensor(list(b"{oops"), dtype=torch.uint8)
            ),
            r"w\.quant_state\.bitsandbytes__nf4: not a JSON",
        ),
        (
            lambda t: t.__setitem__("quant_state.bitsandbytes__fp4", t.pop("quant_state.bitsandbytes__nf4")),
            r"quant_type 'nf4' does not match",
        ),
    ],
)
def test_inconsistent_quant_state_names_the_tensor(corrupt, message):
    tensors = _state_tensors()
    corrupt(tensors)
    with pytest.raises(ValueError, match=message):
        QuantState.from_tensors(tensors, name="w")


def test_search_table_equals_bucketize_on_midpoints():
    """The table-plus-two-comparisons search is exactly ``bucketize(s, midpoints)`` (ties low)."""
    from loraforge.quant.nf4 import _nibbles, _Scratch, _search_tables

    g = torch.Generator().manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        code = lf.quant.get_code(quant_type)
        order = torch.sort(code, stable=True).indices
        mid = (code[order[:-1]] + code[order[1:]]) / 2
        near = torch.cat([mid, mid.nextafter(torch.tensor(2.0)), mid.nextafter(torch.tensor(-2.0))])
        cells = torch.arange(-1024, 1025) / 1024  # the table's cell edges and their neighbours
        edges = torch.cat([cells, cells.nextafter(torch.tensor(2.0)), cells.nextafter(torch.tensor(-2.0))])
        s = torch.cat([torch.rand(100_000, generator=g) * 2 - 1, near, edges, code]).clamp(-1, 1)
        got = _nibbles(
            s, _search_tables(quant_type, s.device), _Scratch(s.numel(), s.device), quant_type == "fp4"
        )
        want = order[torch.bucketize(s, mid)].int()
        assert torch.equal(got, want), quant_type
    assert math.isclose(lf.quant.get_code("nf4")[7].item(), 0.0)


@pytest.mark.parametrize("chunk", [64, 4096])
def test_chunking_and_thread_pool_do_not_change_results(monkeypatch, chunk):
    """Small chunks force many chunks, the thread pool and a partial last chunk on every path."""
    from loraforge.quant import nf4

    g = torch.Generator().manual_seed(5)
    cases = [torch.randn(301, 67, generator=g), torch.randn(64 * 170 + 3, generator=g).bfloat16()]
    want = []
    for w in cases:
        for quant_type in ("nf4", "fp4"):
            p, s = quantize_4bit(w, quant_type, 64, double_quant=True)
            want.append((p, s.absmax, dequantize_4bit(p, s), dequantize_4bit(p, s, torch.float32)))
    monkeypatch.setattr(nf4, "_CPU_CHUNK", chunk)
    got = []
    for w in cases:
        for quant_type in ("nf4", "fp4"):
            p, s = quantize_4bit(w, quant_type, 64, double_quant=True)
            got.append((p, s.absmax, dequantize_4bit(p, s), dequantize_4bit(p, s, torch.float32)))
    for a, b in zip(want, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
