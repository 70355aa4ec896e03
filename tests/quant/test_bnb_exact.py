"""Bit-exactness against bitsandbytes' CPU output (issue 3, item 1).

Packed bytes, absmax, nested absmax and offset must equal ``bitsandbytes.functional.quantize_4bit``
for random and real (MiniLM) weights of many shapes, NF4 and FP4, blocksizes 64 and 128, with and
without double quantization; dequantization must equal bitsandbytes' reference formula.
"""

from __future__ import annotations

import pytest
import torch

import loraforge as lf
from loraforge.quant import _bnb_tables

# odd counts, counts not divisible by the blocksize, a single element, a partial single block
SHAPES = [(64, 64), (33, 17), (7,), (1,), (3, 5), (257, 129), (100, 33), (2, 64 * 256 + 5), (384, 1536)]


def _bnb_reference_dequant(bnb, packed, state) -> torch.Tensor:
    """bitsandbytes' own pure-PyTorch dequantization formula (backends/default/ops.py).

    Its native CPU kernel is not used as the reference: in bitsandbytes 0.50 it returns wrong values
    when blocks span rows (in_features not a multiple of the blocksize); see the test below.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    return fn(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


def assert_same(bnb, w, quant_type, blocksize, double_quant):
    p1, s1 = bnb.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    p2, s2 = lf.quant.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    where = f"{tuple(w.shape)} {w.dtype} {quant_type} bs={blocksize} dq={double_quant}"
    assert p2.shape == p1.shape == ((w.numel() + 1) // 2, 1), where
    assert torch.equal(p2, p1), f"packed bytes differ: {where}"
    assert torch.equal(s2.absmax, s1.absmax), f"absmax differs: {where}"
    assert torch.equal(s2.code, s1.code), where
    if double_quant:
        assert torch.equal(s2.state2.absmax, s1.state2.absmax), f"nested absmax differs: {where}"
        assert torch.equal(s2.offset, s1.offset), f"offset differs: {where}"
        assert torch.equal(s2.state2.code, s1.state2.code), where
    ours = lf.quant.dequantize_4bit(p2, s2)
    assert ours.dtype == w.dtype and ours.shape == w.shape
    assert torch.equal(ours.reshape(-1), _bnb_reference_dequant(bnb, p1, s1).reshape(-1)), f"dequant: {where}"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_random_weights_bit_exact(bnb, quant_type, blocksize, double_quant):
    g = torch.Generator().manual_seed(blocksize + double_quant)
    for shape in SHAPES:
        # rows of very different scale, so the absmax values (and their 8-bit codes) vary widely
        w = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3
        assert_same(bnb, w, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_bit_exact(bnb, dtype):
    w = torch.randn(129, 65, generator=torch.Generator().manual_seed(3)).to(dtype)
    for quant_type in ("nf4", "fp4"):
        assert_same(bnb, w, quant_type, 64, True)


def test_real_minilm_weights_bit_exact(bnb, minilm):
    names = [k for k in minilm if k.startswith(("encoder.layer.0.", "encoder.layer.5."))]
    assert len(names) == 12
    for quant_type in ("nf4", "fp4"):
        for blocksize in (64, 128):
            for double_quant in (False, True):
                for name in names:
                    assert_same(bnb, minilm[name], quant_type, blocksize, double_quant)


def test_edge_values_bit_exact(bnb):
    nf4 = lf.quant.get_code("nf4")
    mids = (nf4[:-1] + nf4[1:]) / 2
    cases = {
        "zeros": torch.zeros(130),
        "constant (one block: absmax - offset = 0)": torch.full((64,), 0.5),
        "exact midpoints (ties go low)": torch.cat([torch.ones(1), mids, -mids, torch.zeros(33)]),
        "exact codes": torch.cat([nf4, lf.quant.get_code("fp4")]),
        "tiny": torch.randn(200) * 1e-30,
        "zero tail block": torch.cat([torch.randn(64), torch.zeros(10)]),
    }
    for name, w in cases.items():
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                try:
                    assert_same(bnb, w, quant_type, 64, double_quant)
                except AssertionError as e:
                    raise AssertionError(f"{name}: {e}") from None


def test_dynamic_map_and_codes_match(bnb):
    assert torch.equal(lf.quant.dynamic_map(), bnb.create_dynamic_map(signed=True))
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(lf.quant.get_code(quant_type), bnb.get_4bit_type(quant_type, device="cpu"))


def test_double_quant_thresholds_match_installed_kernel(bnb):
    """Re-measure the 255 decision thresholds of bitsandbytes' CPU 8-bit quantizer by bisection
    over fp32 bit patterns and compare with the table loraforge ships (``_bnb_tables``)."""
    code = bnb.create_dynamic_map(signed=True)

    def kernel_index(s: torch.Tensor) -> torch.Tensor:  # one block [1.0, s] per value: absmax == 1
        blocks = torch.stack([torch.ones_like(s), s], dim=1).reshape(-1)
        q, state = bnb.quantize_blockwise(blocks, code=code.clone(), blocksize=2)
        assert bool((state.absmax == 1).all())
        return q.view(-1, 2)[:, 1].long()

    def to_key(f):  # fp32 -> integer that sorts like the float
        i = f.view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    def to_float(k):
        return torch.where(k < 0, (-k) | -(2**31), k).to(torch.int32).view(torch.float32)

    want = torch.arange(1, 256)
    lo, hi = to_key(torch.full((255,), -1.0)), to_key(torch.full((255,), 1.0))
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        reached = kernel_index(to_float(mid)) >= want
        hi, lo = torch.where(reached, mid, hi), torch.where(reached, lo, mid)
    measured = to_float(hi).view(torch.int32).tolist()
    shipped = torch.tensor(_bnb_tables.DYNAMIC_MAP_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32).tolist()
    assert measured == shipped


def test_bnb_native_cpu_dequant_differs_when_blocks_span_rows(bnb):
    """Documents why the reference above is bitsandbytes' formula and not its native CPU kernel."""
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))  # 96 is not a multiple of 64
    p, s = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = lf.quant.dequantize_4bit(*lf.quant.quantize_4bit(w, "nf4", 64, double_quant=False))
    reference = _bnb_reference_dequant(bnb, p, s)
    assert torch.equal(ours, reference)
    native = bnb.dequantize_4bit(p, s)
    # whichever way bitsandbytes goes, ours is the formula and at least as close to w as the kernel
    assert (ours - w).abs().mean() <= (native - w).abs().mean() + 1e-7
