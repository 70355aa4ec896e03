"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, byte-compatible with bitsandbytes.

Format (bitsandbytes 0.50, CPU reference ``bitsandbytes/backends/default/ops.py``):

* A weight ``W`` of any shape is flattened row-major into ``x`` of length ``n`` and cut into
  ``m = ceil(n / B)`` blocks of ``B = blocksize`` elements (a block may span rows; the last one may
  be partial). Per block ``absmax_b = max_i |x_i|`` in fp32.
* Each element is normalised, ``s_i = x_i / absmax_b`` in [-1, 1], and mapped to the nearest of 16
  code values; a value exactly on the midpoint of two neighbouring codes goes to the lower one.
  NF4 codes are the quantiles of N(0, 1) with an exact zero, in value order, so the nibble is the
  bucket number; FP4 (E2M1) codes are stored in bit-pattern order, so the bucket goes through a
  permutation.
* Two nibbles share a byte: element ``2i`` in the high nibble, ``2i+1`` in the low one. An odd
  count is padded with the value 0.0 (so the pad nibble is 0.0's code: 7 in NF4, 0 in FP4):
  ``packed`` is uint8 of shape ``((n + 1) // 2, 1)``.
* Dequantization: ``W_hat_i = code[q_i] * absmax_b`` in fp32, then cast.

Double quantization stores the ``m`` fp32 scales in 8 bits: ``offset = mean(absmax)``; ``absmax -
offset`` is quantized blockwise (256 per block) to uint8 with bitsandbytes' signed dynamic map,
keeping one fp32 ``nested_absmax`` per 256 blocks. Storage per weight:
``4 + 8 / B + 32 / (256 B)`` bits, i.e. 4.127 for ``B = 64``.

Speed: the work runs over chunks (32 Ki elements on CPU, so temporaries stay in L2 and each op
runs inline; 16 Mi on an accelerator, to bound temporaries), spread over a thread pool on CPU. The
nearest-code search is a table lookup plus two comparisons instead of ``torch.bucketize`` (about
10x faster), and dequantization gathers both nibbles of a byte at once from a 256-entry table.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from . import _native, _triton
from ._bnb_tables import DYNAMIC_MAP_THRESHOLD_BITS
from .state import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, QuantState

__all__ = [
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "get_code",
    "quantize_4bit",
    "quantize_blockwise_8bit",
]

# NF4: the 16 values of bitsandbytes.functional.get_4bit_type("nf4"), fp32-exact.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# FP4 (E2M1, exponent bias 2) in bit-pattern order: bit 3 is the sign, bits 0-2 the magnitude.
# bitsandbytes divides the table by its largest magnitude (12) in fp32.
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

# Elements per CPU pass: a multiple of every blocksize, and no larger than torch's intra-op grain
# (32768), so each op runs inline in its thread and its temporaries stay in L2.
_CPU_CHUNK = 1 << 15
_GPU_CHUNK = 1 << 24  # bounds the temporaries on an accelerator (about 22 bytes per element)
_GRID = 1024  # cells of the search table on [-1, 1]

_cache: dict[tuple, object] = {}


_pools: dict[int, ThreadPoolExecutor] = {}


def _chunk(device: torch.device) -> int:
    return _CPU_CHUNK if device.type == "cpu" else _GPU_CHUNK


def _run_chunks(total: int, chunk: int, body, device: torch.device) -> None:
    """Call ``body(lo, hi)`` on consecutive pieces of ``[0, total)`` cut at multiples of ``chunk``.

    On CPU, a large tensor is split into one piece per torch thread and the pieces run in a thread
    pool (torch ops release the GIL); each piece loops over its chunks. This scales over cores
    without a fork-join barrier per op, which is what hurts small ops on a busy machine.
    """
    n_chunks = -(-total // chunk)
    workers = min(torch.get_num_threads(), n_chunks // 8) if device.type == "cpu" else 1
    if workers <= 1:
        body(0, total)
        return
    key = (os.getpid(), workers)  # a pool does not survive fork
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="loraforge-nf4")
    per = -(-n_chunks // workers) * chunk
    futures = [_pools[key].submit(body, lo, min(lo + per, total)) for lo in range(0, total, per)]
    for f in futures:
        f.result()


def _cached(key: tuple, build):
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")


def get_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 code values of ``quant_type`` as fp32 on ``device``, indexed by the stored nibble."""
    _check_quant_type(quant_type)
    device = torch.device(device or "cpu")

    def build():
        if quant_type == "nf4":
            return torch.tensor(_NF4, dtype=torch.float32, device=device)
        code = torch.tensor(_FP4, dtype=torch.float32, device=device)
        return code / code.abs().max()

    return _cached(("code", quant_type, device), build)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), fp32[256], sorted.

    A dynamic exponent 10^-6..10^0 and a linear fraction that shrinks as the exponent grows
    (Dettmers 2015): exponent step ``i`` has ``2^i + 1`` fp32-linspace boundaries on [0.1, 1] and
    contributes ``±10^(i-6)`` times the bucket centres; then 0 and 1: 127 + 127 + 2 values.
    """
    device = torch.device(device or "cpu")

    def build():
        values = []
        for i in range(7):  # 7 exponent steps of a one-off 256-entry table
            bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
            means = (bounds[:-1] + bounds[1:]) / 2.0
            scale = 10 ** (-6 + i)
            values += (scale * means).tolist() + (-scale * means).tolist()
        values += [0.0, 1.0]
        return torch.tensor(sorted(values), dtype=torch.float32, device=device)

    return _cached(("dynamic", device), build)


def _search_tables(quant_type: str, device: torch.device):
    """Tables for the nearest-code search of normalised values ``s`` in [-1, 1].

    With ``mid`` the 15 midpoints of the codes in value order, the bucket of ``s`` is
    ``#{k : mid_k < s}`` (a value on a midpoint goes to the lower code, like ``torch.bucketize``
    in bitsandbytes). We find it without a binary search: cut [-1, 1] into ``_GRID`` cells;
    ``first[c]`` counts the midpoints below cell ``c``'s left edge minus ``eps``; then at most two
    midpoints remain between that and ``s`` (the closest codes, FP4's 0 and ±0.0052, are more than a
    cell apart), so two ``bucket += s > mid[bucket]`` steps finish it exactly. ``eps = 1e-6`` covers
    the rounding of ``(s + 1) * _GRID / 2`` (at most 2^-23 in units of ``s``).

    Returns ``(first int32[_GRID], mid_ext fp32[16] = mid + [inf], nibble int32[16])`` where
    ``nibble[bucket]`` is the stored 4-bit value.
    """

    def build():
        code = get_code(quant_type, "cpu")
        order = torch.sort(code, stable=True).indices  # FP4's +0 (nibble 0) sorts before -0 (nibble 8)
        mid = (code[order[:-1]] + code[order[1:]]) / 2
        left = torch.arange(_GRID, dtype=torch.float64) * (2 / _GRID) - 1
        first = torch.searchsorted(mid.double(), left - 1e-6)
        last = torch.searchsorted(mid.double(), left + 2 / _GRID + 1e-6)
        assert int((last - first).max()) <= 2, "search table too coarse for this code"
        mid_ext = torch.cat([mid, torch.tensor([math.inf])])
        return first.to(torch.int32).to(device), mid_ext.to(device), order.to(torch.int32).to(device)

    return _cached(("search", quant_type, device), build)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """byte -> (code[high nibble], code[low nibble]) as 256 8-byte words, each the bits of two fp32.

    Gathering one 8-byte word per packed byte writes both output elements at once.
    """
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).float().contiguous()
    return pairs.view(torch.float64).reshape(256)  # (float64 gathers a little faster than int64)


class _Scratch:
    """Work buffers for one chunk of ``size`` elements, reused from chunk to chunk."""

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.f = torch.empty(size, dtype=torch.float32, device=device)
        self.g = torch.empty(size, dtype=torch.float32, device=device)
        self.i = torch.empty(size, dtype=torch.int32, device=device)
        self.j = torch.empty(size, dtype=torch.int32, device=device)
        self.b = torch.empty(size, dtype=torch.bool, device=device)
        self.h = torch.empty(size // 2, dtype=torch.int32, device=device)


def _nibbles(s: torch.Tensor, tables, buf: _Scratch, fp4: bool) -> torch.Tensor:
    """4-bit index of each normalised value in ``s`` (fp32, flat, ``buf.size`` long), as int32."""
    first, mid_ext, nibble = tables
    u = torch.add(s, 1.0, out=buf.g).mul_(_GRID / 2)
    cell = buf.i.copy_(u).clamp_(0, _GRID - 1)  # truncation == floor, since u >= 0
    bucket = torch.index_select(first, 0, cell, out=buf.j)
    for _ in range(2):
        bucket.add_(torch.gt(s, torch.index_select(mid_ext, 0, bucket, out=buf.g), out=buf.b))
    if fp4:
        bucket = torch.index_select(nibble, 0, bucket, out=buf.i)
    return bucket


def _pack(q: torch.Tensor, out: torch.Tensor, buf: _Scratch) -> None:
    """``out[i] = q[2i] << 4 | q[2i+1]`` (uint8) for an even-length int32 ``q``."""
    out.copy_(torch.add(q[1::2], q[0::2], alpha=16, out=buf.h))


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` (fp32/fp16/bf16, any shape, ``n`` elements) to packed 4-bit.

    Returns ``(packed, state)``: ``packed`` uint8 of shape ``((n + 1) // 2, 1)`` on the weight's
    device and its :class:`QuantState`. Bit-exact with bitsandbytes' CPU
    ``quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type=quant_type)``.
    """
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"quantize_4bit: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("quantize_4bit: weight is empty")
    device = weight.device
    x = weight.detach().reshape(-1)
    n = x.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    tables = _search_tables(quant_type, device)
    fp4 = quant_type == "fp4"

    chunk = _chunk(device)

    def blocks_of(xs, am, out, buf) -> None:  # whole blocks: bitsandbytes multiplies by 1 / absmax
        xs = (
            xs.view(-1, blocksize)
            if xs.dtype == torch.float32
            else buf.g.view(-1, blocksize).copy_(xs.view(-1, blocksize))
        )
        torch.amax(torch.abs(xs, out=buf.f.view_as(xs)), dim=1, out=am)
        # the same expression as bitsandbytes: the last bit of s decides ties at the midpoints
        s = torch.mul(xs, (1.0 / am.clamp(min=1e-38))[:, None], out=buf.f.view_as(xs))
        _pack(_nibbles(s.view(-1), tables, buf, fp4), out, buf)

    def body(lo: int, hi: int) -> None:  # loops over chunks of 32 Ki elements, not over elements
        bufs: dict[int, _Scratch] = {}
        for xs, am, out in zip(
            x[lo:hi].split(chunk), absmax[lo // blocksize : hi // blocksize].split(chunk // blocksize),
            packed[lo // 2 : hi // 2].split(chunk // 2),
        ):  # fmt: skip
            k = xs.numel()
            blocks_of(xs, am, out, bufs.setdefault(k, _Scratch(k, device)))

    if full:
        _run_chunks(full, chunk, body, device)
    if full < n:  # the partial last block: bitsandbytes divides, and stores the clamped absmax
        tail = x[full:].float()
        tail_max = tail.abs().amax().clamp(min=1e-38)
        absmax[-1] = tail_max
        buf = _Scratch(n - full + (n - full) % 2, device)
        s = buf.f.zero_()  # an odd count gets a 0.0 pad value
        torch.div(tail, tail_max, out=s[: n - full])
        _pack(_nibbles(s, tables, buf, fp4), packed[full // 2 :], buf)

    code = get_code(quant_type, device)
    packed = packed.unsqueeze(1)
    if not double_quant:
        return packed, QuantState(absmax, code, blocksize, quant_type, weight.dtype, weight.shape)
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    state2 = QuantState(nested_absmax, dynamic_map(device), NESTED_BLOCKSIZE, None, torch.float32)
    return packed, QuantState(
        qabsmax, code, blocksize, quant_type, weight.dtype, weight.shape, offset, state2
    )


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: ``W_hat = code[q] * absmax[block]`` in fp32, cast to ``dtype``.

    ``packed``: ``(n + 1) // 2`` bytes (any shape; other storage dtypes are viewed as uint8);
    returns a tensor of ``state.shape`` in ``dtype`` (default ``state.dtype``), written into
    ``out`` when given (a contiguous tensor of as many elements: reuse one buffer across calls and
    skip the allocation, whose page faults cost more than the dequantization itself). On CPU the whole
    blocks go through the C loop of ``_dequant.c`` when it could be built (see ``_native``);
    otherwise, per chunk: one gather of 8-byte (high, low) code pairs by byte value, one broadcast
    multiply by the block scales, one cast. On CUDA, one Triton kernel (``_triton``) when Triton
    is importable, else the PyTorch path. All give the same bits.
    """
    if hasattr(packed, "to_local"):
        # a tensor subclass (an FSDP DTensor shard: its numel is the whole tensor's, its memory a
        # slice) would send the C loop past the end of its buffer
        raise TypeError(
            f"dequantize_4bit: the packed weight is a {type(packed).__name__} shard, not a plain tensor "
            "(a sharded weight is dequantized inside its FSDP unit's forward, where it is gathered)"
        )
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bitsandbytes' quant_storage may be another dtype
    if state.shape is None:
        raise ValueError("dequantize_4bit: the quant state has no shape")
    n = math.prod(state.shape)
    n_bytes = (n + 1) // 2
    if packed.numel() != n_bytes:
        raise ValueError(
            f"dequantize_4bit: {packed.numel()} packed bytes do not fit shape {list(state.shape)}"
        )
    dtype = dtype or state.dtype
    device = packed.device
    bs = state.blocksize
    src = packed.reshape(-1)

    if out is not None and (
        out.dtype != dtype or out.device != device or out.numel() != n or not out.is_contiguous()
    ):
        raise ValueError(
            f"dequantize_4bit: out= must be a contiguous {dtype} tensor of {n} elements on {device}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}"
        )
    if _triton.usable(src):  # CUDA: one kernel, scales and all (see _triton)
        result = torch.empty(state.shape, dtype=dtype, device=device) if out is None else out
        return _triton.dequantize(src, state, result).view(state.shape)  # (src: reshape gives contiguous)
    absmax = state.dequantize_absmax()
    pairs = _pair_table(state.code.to(device))
    given = out is not None
    # a work buffer where none is given, for an odd count (the pad nibble is one element more), or
    # where ``out`` is not 8-byte aligned (the PyTorch path writes 8-byte code pairs)
    if out is None or n % 2 or out.data_ptr() % 8:
        work = torch.empty(2 * n_bytes, dtype=dtype, device=device)
        result = work[:n].view(state.shape) if out is None else out.view(state.shape)
        out = work
    else:
        result, out = out.view(state.shape), out.view(-1)
    full = n - n % bs
    blocks = absmax[: full // bs, None]
    chunk = _chunk(device)

    def body(lo: int, hi: int) -> None:  # whole blocks [lo, hi), in chunks of 32 Ki elements
        scratch = None if dtype == torch.float32 else torch.empty(min(chunk, hi - lo), device=device)
        idx = torch.empty(min(chunk, hi - lo) // 2, dtype=torch.int32, device=device)
        for src_k, out_k, scale_k in zip(
            src[lo // 2 : hi // 2].split(chunk // 2),
            out[lo:hi].split(chunk),
            blocks[lo // bs : hi // bs].split(chunk // bs),
        ):
            k = src_k.numel()
            # fp32 output is computed in place; another dtype in an fp32 chunk, rounded once on copy
            vals = out_k if scratch is None else scratch[: 2 * k]
            ix = idx if k == idx.numel() else idx[:k]
            torch.index_select(pairs, 0, ix.copy_(src_k), out=vals.view(pairs.dtype))
            vals.view(-1, bs).mul_(scale_k)
            if scratch is not None:
                out_k.copy_(vals)

    if full and _native.usable(src, out, absmax, bs):  # the C loop (_dequant.c): one pass, same bits
        code = state.code.to(device=device, dtype=torch.float32)
        # non-temporal stores pay off where the memory was written before (a reused buffer, or
        # heap memory); a fresh mapping is faulted in page by page, each fault bringing its page
        # into the cache, and is better written with ordinary stores
        stream = given or _native.written_before(out)

        def native(lo: int, hi: int) -> None:
            _native.dequantize_blocks(src, absmax, code, out, lo // bs, hi // bs, bs, stream=stream)

        _run_chunks(full, chunk, native, device)
    elif full:
        _run_chunks(full, chunk, body, device)
    if full < 2 * n_bytes:  # the partial last block and the pad nibble
        vals = pairs[src[full // 2 :].long()].view(torch.float32) * absmax[-1]
        out[full:].copy_(vals)
    if out.data_ptr() != result.data_ptr():  # odd n with out=: the work buffer had the pad element
        result.view(-1).copy_(out[:n])
    return result


def _dq_thresholds(device: torch.device) -> torch.Tensor:
    def build():
        bits = torch.tensor(DYNAMIC_MAP_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32)
        return bits.view(torch.float32).to(device)

    return _cached(("dq_thresholds", device), build)


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization to the signed dynamic map, as bitsandbytes' CPU kernel does it.

    ``x``: fp32 of any shape, flattened into blocks of ``blocksize``; per block ``a_b = max |x|``
    and ``s = x / a_b``. The index is ``#{k : t_k <= s}`` for the 255 decision thresholds of
    bitsandbytes' CPU kernel (see ``_bnb_tables``: close to, but not always at, the midpoints of
    the map). An all-zero block gives ``0 / 0``, for which bitsandbytes writes index 0.

    Returns ``(q uint8 of x.shape, absmax fp32[ceil(n / blocksize)])``.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # zero padding never raises a block's max
    s = (padded / absmax[:, None]).reshape(-1)[:n]
    q = torch.searchsorted(_dq_thresholds(x.device), s, right=True)
    q = q.masked_fill_(torch.isnan(s), 0)
    return q.to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in fp32, flat; the inverse of :func:`quantize_blockwise_8bit`."""
    vals = code[q.reshape(-1).long()]
    return vals * absmax.repeat_interleave(blocksize)[: vals.numel()]
