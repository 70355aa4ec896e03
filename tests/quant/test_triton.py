"""The CUDA dequantization kernel (quant/_triton.py): bit-identical to the other paths.

On a GPU it runs as compiled; without one it runs in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``), where Triton is installed. Without Triton these tests skip (CI installs
no Triton: the CPU build of torch does not need it).
"""

from __future__ import annotations

import pytest
import torch

from loraforge.quant import _triton, dequantize_4bit, quantize_4bit

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LORAFORGE_TRITON", raising=False)


def _reference(monkeypatch, packed, state, dtype):
    """The same call with the kernel switched off: PyTorch ops on CUDA, the C loop / PyTorch on CPU."""
    with monkeypatch.context() as m:
        m.setenv("LORAFORGE_TRITON", "0")
        assert not _triton.usable(packed)
        return dequantize_4bit(packed, state, dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(48, 96), (37, 129), (3, 1)])  # whole blocks; partial + odd count; tiny
def test_kernel_matches_other_paths_bit_for_bit(
    monkeypatch, dtype, quant_type, blocksize, double_quant, shape
):
    g = torch.Generator().manual_seed(hash((shape, blocksize)) % 2**31)
    rows = torch.logspace(-3, 1, shape[0]).unsqueeze(1)  # blocks with very different absmax
    w = (torch.randn(shape, generator=g) * rows).to(DEVICE, dtype)
    packed, state = quantize_4bit(w, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
    assert _triton.usable(packed)
    got = dequantize_4bit(packed, state, dtype)
    want = _reference(monkeypatch, packed, state, dtype)
    assert got.device == w.device and got.dtype == dtype
    assert _same_bits(got, want)
    # out=: every element written (poisoned first), the buffer itself returned
    buf = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    into = dequantize_4bit(packed, state, dtype, out=buf)
    assert into.data_ptr() == buf.data_ptr() and _same_bits(into, want)


def test_bf16_rounds_to_nearest_even(monkeypatch):
    """Values halfway between two bf16 numbers: the kernel rounds by hand, as torch's cast does."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    packed, state = quantize_4bit(w, blocksize=64, double_quant=False)
    state.absmax.copy_(1.0 + torch.arange(state.absmax.numel(), device=DEVICE) * 2.0**-8)  # ties in bf16
    got = dequantize_4bit(packed, state, torch.bfloat16)
    fp32 = dequantize_4bit(packed, state, torch.float32)
    assert _same_bits(got, fp32.to(torch.bfloat16))
    assert _same_bits(got, _reference(monkeypatch, packed, state, torch.bfloat16))


def test_switched_off_by_environment(monkeypatch):
    packed = torch.zeros(8, dtype=torch.uint8, device=DEVICE)
    assert _triton.usable(packed)
    monkeypatch.setenv("LORAFORGE_TRITON", "0")
    assert not _triton.usable(packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_compiled_graph_operator_matches_other_paths(monkeypatch, dtype, double_quant):
    """The kernel as the ``triton_op`` that compiled 4-bit layers use: called as is (in the
    interpreter on CPU) and, on a GPU, inside ``torch.compile`` (Inductor builds it itself, with
    fp fusion on: the PTX multiply keeps the bits)."""
    w = (torch.randn(37, 129, generator=torch.Generator().manual_seed(5)) * 3).to(DEVICE, dtype)
    packed, state = quantize_4bit(w, blocksize=64, double_quant=double_quant)
    want = _reference(monkeypatch, packed, state, dtype)
    assert _triton.prepare_compiled(interpret=DEVICE == "cpu")
    got = _triton.compiled_call(packed, state, dtype, interpret=DEVICE == "cpu")
    assert got.dtype == dtype and _same_bits(got, want)
    if DEVICE == "cuda":
        from loraforge.quant.linear4bit import _dequantize

        torch.compiler.reset()
        compiled = torch.compile(lambda p: _dequantize(p, state, dtype) * 1, fullgraph=True)
        assert _same_bits(compiled(packed), want)
