"""``QuantState``: what it takes to dequantize a packed 4-bit tensor, and its bitsandbytes serialisation.

A bitsandbytes ``Linear4bit`` saved under prefix ``P`` writes (all keys relative to ``P``)::

    weight                                   uint8 ((n + 1) // 2, 1)  packed nibbles
    weight.absmax                            fp32 [m]  or uint8 [m] with double quantization
    weight.quant_map                         fp32 [16]  the 4-bit code
    weight.nested_absmax                     fp32 [ceil(m / 256)]       (double quantization)
    weight.nested_quant_map                  fp32 [256] the dynamic map (double quantization)
    weight.quant_state.bitsandbytes__<type>  uint8 bytes of a JSON object with quant_type, blocksize,
                                             dtype, shape (+ nested_blocksize, nested_dtype,
                                             nested_offset)

where ``n`` is the weight's element count and ``m = ceil(n / blocksize)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from . import _native

__all__ = ["BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256


@dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor (mirrors bitsandbytes' ``QuantState``).

    Attributes:
        absmax: per-block scales, shape ``(m,)`` with ``m = ceil(n / blocksize)``: fp32, or uint8
            indices into ``state2.code`` when double-quantized.
        code: fp32[16] code values indexed by nibble (bitsandbytes' ``quant_map``).
        blocksize: elements per block.
        quant_type: ``"nf4"`` or ``"fp4"`` (``None`` for the nested 8-bit state).
        dtype: dtype of the original weight, the default dequantization dtype.
        shape: shape of the original weight.
        offset: fp32 scalar ``mean(absmax)`` (double quantization only).
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
        """Move all tensors to ``device`` in place; returns ``self``."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def dequantize_absmax(self) -> torch.Tensor:
        """fp32 per-block scales ``(m,)``; with double quantization
        ``absmax_b = code2[q_b] * nested_absmax[b // 256] + offset``."""
        if not self.nested:
            return self.absmax.float()
        s2 = self.state2
        fast = _native.dequantize_absmax(self.absmax, s2.code, s2.absmax, self.offset, s2.blocksize)
        if fast is not None:
            return fast
        vals = s2.code[self.absmax.long()]
        scale = s2.absmax.repeat_interleave(s2.blocksize)[: vals.numel()]
        return vals * scale + self.offset

    def packed_json(self) -> dict:
        """The non-tensor fields bitsandbytes packs into ``quant_state.bitsandbytes__<type>`` (same order)."""
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
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(
            bytearray(blob), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str = "weight") -> QuantState:
        """Rebuild a state from the keys written by :meth:`as_tensors` (keys relative to ``<name>.``).

        Raises ``ValueError`` naming the offending tensor when the state is missing or inconsistent.
        """
        blobs = [k for k in tensors if k.startswith("quant_state.")]
        if len(blobs) != 1 or blobs[0].rsplit("__", 1)[-1] not in QUANT_TYPES:
            found = [f"{name}.{k}" for k in blobs] or "none"
            raise ValueError(
                f"{name}: expected one '{name}.quant_state.bitsandbytes__nf4|fp4' tensor, found {found}"
            )
        blob_key = blobs[0]
        where = f"{name}.{blob_key}"
        try:
            meta = json.loads(
                bytes(tensors[blob_key].to("cpu", torch.uint8).reshape(-1).numpy()).decode("utf-8")
            )
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not a JSON quant state ({e})") from None
        qtype = blob_key.rsplit("__", 1)[1]
        if not isinstance(meta, dict) or meta.get("quant_type") != qtype:
            raise ValueError(f"{where}: quant_type {meta.get('quant_type')!r} does not match the key")
        for k in ("blocksize", "dtype", "shape"):
            if k not in meta:
                raise ValueError(f"{where}: field {k!r} missing")
        if meta["blocksize"] not in BLOCKSIZES:
            raise ValueError(f"{where}: unsupported blocksize {meta['blocksize']!r}")

        def need(key: str) -> torch.Tensor:
            if key not in tensors:
                raise ValueError(f"{name}.{key}: missing from the checkpoint (required by {where})")
            return tensors[key]

        shape = torch.Size(meta["shape"])
        n_blocks = -(-math.prod(shape) // meta["blocksize"])
        absmax, code = need("absmax"), need("quant_map")
        if absmax.numel() != n_blocks:
            raise ValueError(
                f"{name}.absmax: {absmax.numel()} values, but shape {list(shape)} needs {n_blocks}"
            )
        if code.numel() != 16 or not code.is_floating_point():
            raise ValueError(
                f"{name}.quant_map: expected 16 floating values, got {code.numel()} {code.dtype}"
            )
        offset = state2 = None
        if "nested_offset" in meta:
            nabs, ncode = need("nested_absmax"), need("nested_quant_map")
            nbs = meta.get("nested_blocksize", NESTED_BLOCKSIZE)
            if absmax.dtype != torch.uint8:
                raise ValueError(f"{name}.absmax: double-quantized absmax must be uint8, got {absmax.dtype}")
            n_nested = -(-n_blocks // nbs)
            if nabs.numel() != n_nested:
                raise ValueError(
                    f"{name}.nested_absmax: {nabs.numel()} values; {n_blocks} blocks need {n_nested}"
                )
            if ncode.numel() != 256:
                raise ValueError(f"{name}.nested_quant_map: expected 256 values, got {ncode.numel()}")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
            state2 = cls(
                nabs.float(), ncode.float(), nbs, None, _dtype(meta.get("nested_dtype", "float32"), where)
            )
        else:
            if not absmax.is_floating_point():
                raise ValueError(
                    f"{name}.absmax: {absmax.dtype}, but {where} has no nested_offset (no double quant)"
                )
            extra = [k for k in ("nested_absmax", "nested_quant_map") if k in tensors]
            if extra:
                raise ValueError(f"{name}.{extra[0]}: present, but {where} has no nested_offset")
        dtype = _dtype(meta["dtype"], where)
        return cls(absmax, code.float(), meta["blocksize"], qtype, dtype, shape, offset, state2)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return dt
