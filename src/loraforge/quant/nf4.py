"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, byte-compatible with bitsandbytes.

Format (bitsandbytes 0.50, CPU reference ``bitsandbytes/backends/default/ops.py``):

* A weight ``W`` of any shape is flattened row-major into ``x`` of length ``n`` and cut into
  ``ceil(n / B)`` blocks of ``B = blocksize`` elements (a block may span rows; the last one may be
  partial). Per block ``absmax_b = max_i |x_i|`` in fp32.
* Each element is normalised, ``s_i = x_i / absmax_b`` (in [-1, 1]), and mapped to the index of the
  nearest of 16 code values ``c_k``; a value exactly on the midpoint of two neighbouring codes goes
  to the lower one. NF4 codes are the quantiles of N(0, 1) with an exact zero, sorted, so the index
  is the bucket number; FP4 (E2M1) codes are stored in bit-pattern order, so the bucket number goes
  through a permutation.
* Two 4-bit indices share a byte: element ``2i`` in the high nibble, ``2i+1`` in the low one, and an
  odd count is padded with a zero nibble. The packed tensor has shape ``((n + 1) // 2, 1)``, uint8.
* Dequantization is ``W_hat_i = c[q_i] * absmax_b`` computed in fp32, then cast.

Double quantization ("compress_statistics") stores the ``m = ceil(n / B)`` fp32 absmax values in
8 bits: ``offset = mean(absmax)``; ``a = absmax - offset`` is quantized blockwise (256 per block) to
uint8 with bitsandbytes' signed dynamic map, keeping one fp32 ``nested_absmax`` per 256 blocks.
Storage per weight: ``4 + 8 / B + 32 / (256 B)`` bits, i.e. 4.127 for ``B = 64``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from ._bnb_tables import DYNAMIC_MAP_THRESHOLD_BITS

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "QuantState",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "get_code",
    "quantize_4bit",
    "quantize_blockwise_8bit",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256

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

_cache: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, build) -> torch.Tensor:
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in 32..4096 {BLOCKSIZES}, got {blocksize!r}")


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


def _bucket_table(quant_type: str, device: torch.device):
    """Midpoints between neighbouring codes in value order, and bucket -> stored-nibble map.

    ``torch.bucketize(s, midpoints)`` (right=False) returns the bucket ``k`` with
    ``mid[k-1] < s <= mid[k]``, so a value exactly on a midpoint goes to the lower code, as in
    bitsandbytes. FP4 has +0 and -0; a stable sort keeps +0 (nibble 0) first, which is the nibble
    bitsandbytes writes for zero.
    """

    def build():
        code = get_code(quant_type, device)
        order = torch.sort(code, stable=True).indices
        sorted_code = code[order]
        mid = (sorted_code[:-1] + sorted_code[1:]) / 2
        return mid, order.to(torch.uint8)

    return _cached(("buckets", quant_type, device), build)


def _pair_index(device: torch.device) -> torch.Tensor:
    """(256, 2) int64: byte -> (high nibble, low nibble); ``code[_pair_index]`` is the pair table."""

    def build():
        byte = torch.arange(256, device=device)
        return torch.stack([byte >> 4, byte & 0xF], dim=1)

    return _cached(("pairs", device), build)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), fp32[256], sorted.

    A dynamic exponent 10^-6..10^0 and a linear fraction whose width shrinks as the exponent grows
    (Dettmers 2015): for exponent step ``i`` the fraction has ``2^i + 1`` boundaries on
    [0.1, 1] (fp32 linspace) and the code values are ``±10^(i-6)`` times the bucket centres; then 0
    and 1. 127 + 127 + 2 = 256 distinct values in [-0.99296875, 1].
    """
    device = torch.device(device or "cpu")

    def build():
        values = []
        for i in range(7):  # 7 exponent steps; a one-off table, built once per device
            bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
            means = (bounds[:-1] + bounds[1:]) / 2.0
            scale = 10 ** (-6 + i)
            values += (scale * means).tolist() + (-scale * means).tolist()
        values += [0.0, 1.0]
        return torch.tensor(sorted(values), dtype=torch.float32, device=device)

    return _cached(("dynamic", device), build)


@dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor (mirrors bitsandbytes' ``QuantState``).

    Attributes:
        absmax: per-block scales, shape ``(ceil(n / blocksize),)``: fp32, or uint8 indices into
            ``state2.code`` when double-quantized.
        code: fp32[16] code values indexed by nibble (the ``quant_map``).
        blocksize: elements per block.
        quant_type: ``"nf4"`` or ``"fp4"``.
        dtype: dtype of the original weight, the default dequantization dtype.
        shape: shape of the original weight.
        offset: fp32 scalar, ``mean(absmax)`` (double quantization only).
        state2: nested state of the 8-bit absmax: ``absmax`` fp32[ceil(m / 256)], ``code`` the
            dynamic map fp32[256], ``blocksize`` 256, ``dtype`` float32.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    quant_type: str | None
    dtype: torch.dtype
    shape: torch.Size | None = None
    offset: torch.Tensor | None = None
    state2: QuantState | None = field(default=None, repr=False)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def to(self, device) -> QuantState:
        """Move all tensors to ``device`` in place and return ``self``."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def dequantize_absmax(self) -> torch.Tensor:
        """fp32 per-block scales (undoing double quantization if present)."""
        if not self.nested:
            return self.absmax.float()
        s2 = self.state2
        return dequantize_blockwise_8bit(self.absmax, s2.absmax, s2.code, s2.blocksize) + self.offset

    def packed_json(self) -> dict:
        """The non-tensor fields bitsandbytes packs into ``quant_state.bitsandbytes__<type>``."""
        d = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d["nested_blocksize"] = self.state2.blocksize
            d["nested_dtype"] = _dtype_name(self.state2.dtype)
            d["nested_offset"] = self.offset.item()
        return d

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors in bitsandbytes' state-dict order, keys relative to ``<prefix>weight.``.

        The code maps are cloned: safetensors refuses tensors sharing storage, and every layer's
        state points at the same cached code tensor.
        """
        out = {"absmax": self.absmax, "quant_map": self.code.clone()}
        if self.nested:
            out["nested_absmax"] = self.state2.absmax
            out["nested_quant_map"] = self.state2.code.clone()
        blob = json.dumps(self.packed_json()).encode("utf-8")
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str = "weight") -> QuantState:
        """Rebuild a state from the keys written by :meth:`as_tensors` (relative to ``<name>.``).

        Raises ``ValueError`` naming the offending tensor when the state is missing or inconsistent.
        """
        blobs = [k for k in tensors if k.startswith("quant_state.bitsandbytes__")]
        if len(blobs) != 1:
            raise ValueError(
                f"{name}: expected exactly one 'quant_state.bitsandbytes__nf4|fp4' entry, found {blobs or 'none'}"
            )
        blob_key = blobs[0]
        try:
            meta = json.loads(bytes(tensors[blob_key].to("cpu", torch.uint8).numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{name}.{blob_key}: not a JSON quant state ({e})") from None
        qtype = blob_key.rsplit("__", 1)[1]
        if meta.get("quant_type") != qtype or qtype not in QUANT_TYPES:
            raise ValueError(f"{name}.{blob_key}: quant_type {meta.get('quant_type')!r} does not match the key")
        for k in ("blocksize", "dtype", "shape"):
            if k not in meta:
                raise ValueError(f"{name}.{blob_key}: field {k!r} missing")
        if meta["blocksize"] not in BLOCKSIZES:
            raise ValueError(f"{name}.{blob_key}: unsupported blocksize {meta['blocksize']!r}")

        def need(key: str) -> torch.Tensor:
            if key not in tensors:
                raise ValueError(f"{name}.{key}: missing from the checkpoint (needed by {name}.{blob_key})")
            return tensors[key]

        shape = torch.Size(meta["shape"])
        n_blocks = -(-math.prod(shape) // meta["blocksize"])
        absmax, code = need("absmax"), need("quant_map")
        if absmax.numel() != n_blocks:
            raise ValueError(f"{name}.absmax: {absmax.numel()} values, shape {list(shape)} needs {n_blocks}")
        if code.numel() != 16:
            raise ValueError(f"{name}.quant_map: expected 16 values, got {code.numel()}")
        nested = "nested_offset" in meta
        offset = state2 = None
        if nested:
            nabs, ncode = need("nested_absmax"), need("nested_quant_map")
            nbs = meta.get("nested_blocksize", NESTED_BLOCKSIZE)
            if absmax.dtype != torch.uint8:
                raise ValueError(f"{name}.absmax: double-quantized absmax must be uint8, got {absmax.dtype}")
            if nabs.numel() != -(-n_blocks // nbs) or ncode.numel() != 256:
                raise ValueError(
                    f"{name}.nested_absmax / nested_quant_map: sizes {nabs.numel()} / {ncode.numel()} do not"
                    f" match {n_blocks} blocks of nested blocksize {nbs}"
                )
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
            state2 = cls(nabs.float(), ncode.float(), nbs, None, _dtype(meta.get("nested_dtype", "float32")))
        else:
            if not absmax.is_floating_point():
                raise ValueError(f"{name}.absmax: expected floating absmax without double quantization")
            extra = [k for k in ("nested_absmax", "nested_quant_map") if k in tensors]
            if extra:
                raise ValueError(f"{name}.{extra[0]}: present but the quant state has no nested_offset")
        return cls(absmax, code.float(), meta["blocksize"], qtype, _dtype(meta["dtype"]), shape, offset, state2)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in quant state")
    return dt


def _dq_thresholds(device: torch.device) -> torch.Tensor:
    def build():
        bits = torch.tensor(DYNAMIC_MAP_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32)
        return bits.view(torch.float32).to(device)

    return _cached(("dq_thresholds", device), build)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization to the signed dynamic map, as bitsandbytes' CPU kernel does it.

    ``x``: fp32 of any shape, flattened into blocks of ``blocksize``; per block ``a_b = max |x|``
    and ``s = x / a_b``. The index is ``#{k : t_k <= s}`` for the 255 decision thresholds of
    bitsandbytes' CPU kernel (see ``_bnb_tables``; they are close to, but not always at, the
    midpoints of the map). An all-zero block gives ``0 / 0``, for which bitsandbytes writes 0.

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
    scale = absmax.repeat_interleave(blocksize)[: vals.numel()]
    return vals * scale


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` (fp32/fp16/bf16, any shape, ``n`` elements) to packed 4-bit.

    Returns ``(packed, state)``: ``packed`` uint8 of shape ``((n + 1) // 2, 1)`` on the weight's
    device and the :class:`QuantState`. Bit-exact with ``bitsandbytes.functional.quantize_4bit(...,
    compress_statistics=double_quant)`` on CPU.
    """
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if not weight.is_floating_point() or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"quantize_4bit: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("quantize_4bit: weight is empty")
    device = weight.device
    x = weight.detach().reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    mid, nibble_of_bucket = _bucket_table(quant_type, device)

    # Normalised values, padded with a zero to an even count. bitsandbytes multiplies full blocks
    # by the reciprocal of their absmax but divides the partial tail block; the last bit of `s`
    # decides ties at the midpoints, so we do exactly the same.
    s = torch.zeros(n + n % 2, dtype=torch.float32, device=device)
    parts = []
    if full:
        blocks = x[:full].view(-1, blocksize)
        absmax = blocks.abs().amax(dim=1)
        torch.mul(blocks, (1.0 / absmax.clamp(min=1e-38))[:, None], out=s[:full].view(-1, blocksize))
        parts.append(absmax)
    if full < n:
        tail_max = x[full:].abs().amax().clamp(min=1e-38)  # bitsandbytes stores the clamped value here
        torch.div(x[full:], tail_max, out=s[full:n])
        parts.append(tail_max[None])
    absmax = torch.cat(parts) if len(parts) > 1 else parts[0]

    # No clamp to [-1, 1] needed: every midpoint lies inside, so clamping cannot change a bucket.
    q = torch.bucketize(s, mid, out_int32=True).to(torch.uint8)
    if quant_type != "nf4":
        q = nibble_of_bucket[q.long()]
    q = q.view(-1, 2)
    packed = ((q[:, 0] << 4) | q[:, 1]).unsqueeze(1)

    code = get_code(quant_type, device)
    if not double_quant:
        return packed, QuantState(absmax, code, blocksize, quant_type, weight.dtype, weight.shape)
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    state2 = QuantState(nested_absmax, dynamic_map(device), NESTED_BLOCKSIZE, None, torch.float32)
    return packed, QuantState(qabsmax, code, blocksize, quant_type, weight.dtype, weight.shape, offset, state2)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: ``W_hat = code[q] * absmax[block]`` in fp32, cast to ``dtype``.

    ``packed``: uint8, ``(n + 1) // 2`` bytes (any shape); returns a tensor of ``state.shape`` in
    ``dtype`` (default ``state.dtype``). Fully vectorised: one gather of byte -> (hi, lo) code
    pair from a 256-entry table, one broadcast multiply by the block scales.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"dequantize_4bit: packed weight must be uint8, got {packed.dtype}")
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_4bit: {packed.numel()} packed bytes do not fit shape {list(state.shape)}")
    bs = state.blocksize
    absmax = state.dequantize_absmax()
    # (256, 2) fp32: byte -> (code of high nibble, code of low nibble), from the state's own map
    pairs = state.code.to(packed.device, torch.float32)[_pair_index(packed.device)]
    vals = pairs[packed.reshape(-1).long()].reshape(-1)  # (2 * bytes,) fp32, element order
    full = n - n % bs
    if full:
        vals[:full].view(-1, bs).mul_(absmax[: full // bs, None])
    if full < n:
        vals[full:n].mul_(absmax[-1])
    return vals[:n].view(state.shape).to(dtype or state.dtype)
