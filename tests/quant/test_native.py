"""The C dequantization loop (quant/_dequant.c): built here, and bit-identical to the PyTorch path."""

from __future__ import annotations

import shutil

import pytest
import torch

from loraforge.quant import _native, dequantize_4bit, quantize_4bit

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None,
    reason="no C compiler on this machine: dequantize_4bit uses its PyTorch path",
)


def _eager(monkeypatch, packed, state, dtype):
    with monkeypatch.context() as m:
        m.setenv("LORAFORGE_NATIVE", "0")
        assert not _native.enabled()
        return dequantize_4bit(packed, state, dtype)


def _weights(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.logspace(-3, 1, shape[0]).unsqueeze(1) if len(shape) == 2 else 1.0  # varied absmax
    return torch.randn(shape, generator=g) * rows * scale


@needs_cc
def test_kernel_builds_where_a_compiler_exists():
    assert _native.kernel() is not None, _native.error()
    assert _native.error() is None


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("stream", [False, True], ids=["cached-stores", "streaming-stores"])
def test_native_equals_pytorch_path(monkeypatch, dtype, quant_type, blocksize, stream):
    monkeypatch.setattr(_native, "STREAM_BYTES", 0 if stream else 1 << 60)
    # whole blocks only, a partial last block, an odd element count (pad nibble), blocks across rows
    for shape in [(64, 4096), (37, 96), (3, 1001), (1, 4097 * 3)]:
        w = _weights(shape, blocksize + len(shape)).to(dtype)
        for double_quant in (False, True):
            packed, state = quantize_4bit(w, quant_type, blocksize, double_quant=double_quant)
            native = dequantize_4bit(packed, state, dtype, out=torch.empty(w.numel(), dtype=dtype))
            eager = _eager(monkeypatch, packed, state, dtype)
            where = f"{shape} {dtype} {quant_type} bs={blocksize} dq={double_quant}"
            assert native.dtype == dtype and native.shape == w.shape, where
            assert torch.equal(native.view(-1).view(torch.uint8), eager.view(-1).view(torch.uint8)), where


@needs_cc
def test_native_absmax_equals_pytorch_path(monkeypatch):
    for shape, blocksize in [((300, 1000), 64), ((7, 333), 32), ((1, 64 * 256 * 3 + 64), 64)]:
        packed, state = quantize_4bit(_weights(shape, 5), "nf4", blocksize, double_quant=True)
        native = state.dequantize_absmax()
        with monkeypatch.context() as m:
            m.setenv("LORAFORGE_NATIVE", "0")
            eager = state.dequantize_absmax()
        assert native.dtype == torch.float32 and torch.equal(native, eager), shape


@needs_cc
def test_native_runs_in_pieces_on_the_thread_pool(monkeypatch):
    w = _weights((512, 1024), 3)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    calls = []
    real = _native.dequantize_blocks

    def spy(*args, **kw):
        calls.append(args[4:6])
        return real(*args, **kw)

    monkeypatch.setattr(_native, "dequantize_blocks", spy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    out = dequantize_4bit(packed, state)
    assert sorted(calls) == [(0, 4096), (4096, 8192)]  # two workers, blocks split in halves
    assert torch.equal(out, _eager(monkeypatch, packed, state, torch.float32))


@needs_cc
@pytest.mark.parametrize("flags", [("-O2",), ("-O2", "-mavx512f")], ids=["portable", "avx512f-no-bf16"])
def test_other_builds_equal_pytorch_path(monkeypatch, tmp_path, flags):
    """The plain C loop (no -march=native: no AVX-512) gives the same bits too, including fp16
    overflow to inf and fp16 subnormals, where rounding is done in software; and so does the
    AVX-512 loop without the AVX-512 BF16 instructions (bf16 rounded on the bits)."""
    if "-mavx512f" in flags and "avx512f" not in _native._cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    generic = _native.build(tmp_path, flag_sets=(flags,))
    seen = set()
    for scale in (1.0, 1e5, 1e-6):
        w = _weights((48, 256), 7, scale)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            packed, state = quantize_4bit(w, "nf4", 64, double_quant=False)
            eager = _eager(monkeypatch, packed, state, dtype).reshape(-1)
            out = torch.empty(w.numel(), dtype=dtype)
            absmax = state.dequantize_absmax()
            _native.dequantize_blocks(packed.reshape(-1), absmax, state.code, out, 0, absmax.numel(), 64,
                                      fn=generic)
            assert torch.equal(out.view(torch.uint8), eager.view(torch.uint8)), (scale, dtype)
            if dtype == torch.float16:
                tiny = (eager != 0) & (eager.abs() < torch.finfo(torch.float16).tiny)
                seen |= {"inf"} if bool(eager.isinf().any()) else set()
                seen |= {"subnormal"} if bool(tiny.any()) else set()
    assert seen == {"inf", "subnormal"}  # both software-rounding corners were exercised


def test_disabled_kernel_falls_back(monkeypatch):
    monkeypatch.setenv("LORAFORGE_NATIVE", "off")
    assert _native.kernel() is None
    w = _weights((16, 128), 1)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=False)
    assert (dequantize_4bit(packed, state) - w).abs().max() < w.abs().max() * 0.2


@pytest.mark.parametrize("native", [True, False])
def test_out_buffer(monkeypatch, native):
    monkeypatch.setenv("LORAFORGE_NATIVE", "1" if native else "0")
    for shape in [(32, 256), (5, 13)]:  # whole blocks; a partial block with an odd count
        w = _weights(shape, 2)
        packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
        buf = torch.full((w.numel(),), float("nan"))
        got = dequantize_4bit(packed, state, out=buf)
        assert got.data_ptr() == buf.data_ptr() and got.shape == w.shape
        assert torch.equal(got, dequantize_4bit(packed, state))
        monkeypatch.setattr(_native, "STREAM_BYTES", 0)  # an unaligned out= gets ordinary stores
        unaligned = torch.full((w.numel() + 1,), float("nan"))[1:]
        assert torch.equal(dequantize_4bit(packed, state, out=unaligned), got)
    with pytest.raises(ValueError, match="out= must be a contiguous torch.float32 tensor of 65"):
        dequantize_4bit(packed, state, out=torch.empty(64))
    with pytest.raises(ValueError, match="out= must be"):
        dequantize_4bit(packed, state, torch.bfloat16, out=torch.empty(65))


@pytest.mark.skipif(_native._libc() is None, reason="mincore is asked for on Linux only")
def test_written_before_tells_fresh_pages_from_written_ones():
    import mmap

    # A fresh anonymous mapping, not yet touched. (Not torch.empty: after other tests have loaded
    # and freed a 540 MB model, malloc may hand back pages that are already resident.)
    buf = mmap.mmap(-1, 64 << 20)
    t = torch.frombuffer(buf, dtype=torch.float32)
    assert not _native.written_before(t)
    t.fill_(1.0)
    assert _native.written_before(t)
    del t
