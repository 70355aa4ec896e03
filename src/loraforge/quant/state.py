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

A file is untrusted input, and the dequantization kernels (C, Triton) index the absmax and code
tables without bounds checks in their inner loops. So every ``QuantState`` checks its structure
when it is built (O(1): sizes, block sizes, dtypes; :meth:`QuantState.validate`), and one read
from a file also checks its values (finite scales and codes; :meth:`QuantState.check_values`),
before any kernel sees it. The C entry points check the sizes they are given once more.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from . import _native

__all__ = ["BLOCKSIZES", "FLOAT_DTYPES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a 4-bit weight dequantizes to


class _Invalid(ValueError):
    """A check of :meth:`QuantState.validate` failed. ``key``: the bitsandbytes name of what is
    wrong, a tensor key relative to ``<prefix>weight.`` (``absmax``, ``quant_map``,
    ``nested_absmax``, ``nested_quant_map``) or a field of the packed JSON (``blocksize``,
    ``nested_blocksize``, ``dtype``, ``shape``, ``nested_offset``, ...), so that
    :meth:`QuantState.from_tensors` can name it in the file."""

    def __init__(self, key: str, detail: str, is_field: bool = False):
        super().__init__(f"QuantState {key} {detail}" if is_field else f"QuantState {key}: {detail}")
        self.key, self.detail, self.is_field = key, detail, is_field


def _blocksize_problem(value) -> str | None:
    if type(value) is not int or value not in BLOCKSIZES:  # (bool and float 256.0 are not block sizes)
        return f"must be one of {', '.join(map(str, BLOCKSIZES))}; got {value!r}"
    return None


def _tensor_problem(t, numel: int | None, floating: bool = True) -> str | None:
    """Why ``t`` is not a 1-D tensor of ``numel`` elements (any count when ``None``), floating or
    uint8; ``None`` when it is."""
    if not isinstance(t, torch.Tensor):
        return f"expected a tensor, got {type(t).__name__}"
    ok_dtype = t.is_floating_point() if floating else t.dtype == torch.uint8
    if t.dim() != 1 or not ok_dtype or (numel is not None and t.numel() != numel):
        want = f"{numel} " if numel is not None else ""
        kind = "floating" if floating else "uint8"
        return f"expected {want}{kind} values in a 1-D tensor, got {t.dtype} of shape {list(t.shape)}"
    return None


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

    def __post_init__(self):
        if self.shape is not None and not isinstance(self.shape, torch.Size):
            if not isinstance(self.shape, (list, tuple)) or not all(type(d) is int for d in self.shape):
                raise _Invalid("shape", f"must be a list of positive integers; got {self.shape!r}", True)
            self.shape = torch.Size(self.shape)
        self.validate()

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def validate(self) -> None:
        """Check the structure: O(1), no tensor data read. Raises ``ValueError`` naming the field.

        A 4-bit state (``quant_type`` set): ``blocksize`` in :data:`BLOCKSIZES`; ``shape`` of
        positive integers (``n`` elements, ``m = ceil(n / blocksize)`` blocks); ``dtype`` in
        :data:`FLOAT_DTYPES`; ``code`` 16 floats; ``absmax`` ``m`` floats, or with ``state2``
        ``m`` uint8 indices, a one-element float ``offset`` and a nested state whose ``absmax``
        has ``ceil(m / state2.blocksize)`` floats. A nested state (``quant_type`` ``None``):
        ``blocksize`` in :data:`BLOCKSIZES`, ``code`` 256 floats (a uint8 index reaches them
        all), ``absmax`` 1-D floats, a floating ``dtype``.
        """
        if self.quant_type is None:  # the nested state of double quantization
            self._check_nested()
            return
        if self.quant_type not in QUANT_TYPES:
            raise _Invalid("quant_type", f"must be one of {QUANT_TYPES}; got {self.quant_type!r}", True)
        if (problem := _blocksize_problem(self.blocksize)) is not None:
            raise _Invalid("blocksize", problem, True)
        if self.dtype not in FLOAT_DTYPES:
            names = ", ".join(_dtype_name(d) for d in FLOAT_DTYPES)
            got = _dtype_name(self.dtype) if isinstance(self.dtype, torch.dtype) else repr(self.dtype)
            raise _Invalid("dtype", f"must be one of {names} (the weight's dtype); got {got}", True)
        if self.shape is None or not all(type(d) is int and d > 0 for d in self.shape):
            raise _Invalid("shape", f"must be a list of positive integers; got {self.shape!r}", True)
        n = math.prod(self.shape)
        m = -(-n // self.blocksize)
        if (problem := _tensor_problem(self.code, 16)) is not None:
            raise _Invalid("quant_map", problem)
        if not isinstance(self.absmax, torch.Tensor) or self.absmax.numel() != m:
            got = self.absmax.numel() if isinstance(self.absmax, torch.Tensor) else type(self.absmax).__name__
            detail = f"{got} values, but shape {list(self.shape)} in blocks of {self.blocksize} needs {m}"
            raise _Invalid("absmax", detail)
        if self.absmax.dim() != 1:
            raise _Invalid("absmax", f"expected a 1-D tensor, got shape {list(self.absmax.shape)}")
        if not self.nested:
            if not self.absmax.is_floating_point():
                detail = f"{self.absmax.dtype}, but no nested_offset (no double quantization)"
                raise _Invalid("absmax", detail)
            return
        if not isinstance(self.state2, QuantState) or self.state2.quant_type is not None:
            raise _Invalid("state2", "expected the nested state of double quantization (quant_type None)")
        if self.absmax.dtype != torch.uint8:
            raise _Invalid("absmax", f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
        if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1 or self.offset.dim() > 1 \
                or not self.offset.is_floating_point():  # fmt: skip
            raise _Invalid("nested_offset", f"must be a one-element float tensor; got {self.offset!r}", True)
        n_nested = -(-m // self.state2.blocksize)
        if self.state2.absmax.numel() != n_nested:
            raise _Invalid(
                "nested_absmax",
                f"{self.state2.absmax.numel()} values; {m} blocks in nested blocks of "
                f"{self.state2.blocksize} need {n_nested}",
            )

    def _check_nested(self) -> None:
        if (problem := _blocksize_problem(self.blocksize)) is not None:
            raise _Invalid("nested_blocksize", problem, True)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise _Invalid("nested_dtype", f"must be a floating dtype; got {self.dtype!r}", True)
        if (problem := _tensor_problem(self.code, 256)) is not None:
            raise _Invalid("nested_quant_map", problem)
        if (problem := _tensor_problem(self.absmax, None)) is not None:
            raise _Invalid("nested_absmax", problem)

    def check_values(self) -> None:
        """Check the values (reads every scale: done once, for a state read from a file): the
        absmax, code and nested tensors and the offset must be finite. Raises ``ValueError``."""
        tensors = {"quant_map": self.code, "nested_offset": self.offset}
        if self.nested:
            tensors.update(nested_absmax=self.state2.absmax, nested_quant_map=self.state2.code)
        else:
            tensors["absmax"] = self.absmax
        for key, t in tensors.items():
            if t is not None and not bool(torch.isfinite(t).all()):
                bad = t.reshape(-1)[~torch.isfinite(t.reshape(-1))][0].item()
                if key == "nested_offset":
                    raise _Invalid(key, f"must be finite; got {bad}", True)
                raise _Invalid(key, f"non-finite value {bad} (NaN or infinity)")

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

        Checks the structure (:meth:`validate`) and the values (:meth:`check_values`). Raises
        ``ValueError`` naming the offending tensor, or the JSON field of the packed quant state.
        """
        blobs = [k for k in tensors if k.startswith("quant_state.")]
        if len(blobs) != 1 or blobs[0].rsplit("__", 1)[-1] not in QUANT_TYPES:
            found = [f"{name}.{k}" for k in blobs] or "none"
            raise ValueError(
                f"{name}: expected one '{name}.quant_state.bitsandbytes__nf4|fp4' tensor, found {found}"
            )
        blob_key = blobs[0]
        where = f"{name}.{blob_key}"
        blob = tensors[blob_key]
        if blob.dtype != torch.uint8:
            raise ValueError(f"{where}: expected the uint8 bytes of a JSON object, got {blob.dtype}")
        try:
            meta = json.loads(bytes(blob.to("cpu").reshape(-1).numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not a JSON quant state ({e})") from None
        qtype = blob_key.rsplit("__", 1)[1]
        if not isinstance(meta, dict) or meta.get("quant_type") != qtype:
            got = meta.get("quant_type") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{where}: quant_type {got!r} does not match the key")
        for k in ("blocksize", "dtype", "shape"):
            if k not in meta:
                raise ValueError(f"{where}: field {k!r} missing")

        def need(key: str) -> torch.Tensor:
            if key not in tensors:
                raise ValueError(f"{name}.{key}: missing from the checkpoint (required by {where})")
            return tensors[key]

        try:
            absmax, code = need("absmax"), need("quant_map")
            offset = state2 = None
            if "nested_offset" in meta:
                nabs, ncode = need("nested_absmax"), need("nested_quant_map")
                value = meta["nested_offset"]
                if type(value) not in (int, float):  # (JSON gives int or float; never a bool or string)
                    raise _Invalid("nested_offset", f"must be a number; got {value!r}", True)
                offset = torch.tensor(float(value), dtype=torch.float32, device=absmax.device)
                nested_dtype = _dtype(meta.get("nested_dtype", "float32"), "nested_dtype")
                nbs = meta.get("nested_blocksize", NESTED_BLOCKSIZE)
                state2 = cls(_float(nabs), _float(ncode), nbs, None, nested_dtype)
            else:
                extra = [k for k in ("nested_absmax", "nested_quant_map") if k in tensors]
                if extra:
                    raise ValueError(f"{name}.{extra[0]}: present, but {where} has no nested_offset")
            dtype = _dtype(meta["dtype"], "dtype")
            state = cls(absmax, _float(code), meta["blocksize"], qtype, dtype, meta["shape"], offset, state2)
            state.check_values()
        except _Invalid as e:
            if e.is_field:
                raise ValueError(f"{where}: field {e.key!r} {e.detail}") from None
            raise ValueError(f"{name}.{e.key}: {e.detail}") from None
        return state


def _float(t: torch.Tensor) -> torch.Tensor:
    """fp32 copy of a floating tensor (left as is otherwise, for :meth:`QuantState.validate` to refuse)."""
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name, key: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise _Invalid(key, f"must name a torch dtype; got {name!r}", True)
    return dt
