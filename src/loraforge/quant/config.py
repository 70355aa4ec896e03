"""``QuantConfig``: how to quantize a model's linear layers; its transformers ``quantization_config`` form."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from .state import BLOCKSIZES, QUANT_TYPES

__all__ = ["QuantConfig", "dtype_name"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_dtype(value, what: str) -> torch.dtype | str:
    if value == "auto":
        return value
    dt = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of float32, float16, bfloat16 or auto; got {value!r}")
    return dt


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as YAML and ``config.json`` spell it); names pass through."""
    return str(dtype).removeprefix("torch.")


@dataclass
class QuantConfig:
    """4-bit quantization settings (QLoRA).

    Args:
        quant_type: ``"nf4"`` (NormalFloat, the QLoRA default) or ``"fp4"`` (E2M1).
        blocksize: elements per absmax block; a power of two in 32..4096 (64 as in QLoRA).
        double_quant: also quantize the absmax values to 8 bits (saves 0.373 bits per weight at
            blocksize 64: 4.5 -> 4.127).
        compute_dtype: dtype the weight is dequantized to for each matmul (``torch.dtype`` or its
            name); ``"auto"``: the dtype of the weights being quantized (the model's).
        skip_modules: linear layers kept in full precision, matched like PEFT target names: the exact
            module name or a suffix after a dot (``"lm_head"`` matches ``"lm_head"`` and
            ``"model.lm_head"``).
    """

    quant_type: Literal["nf4", "fp4"] = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] | torch.dtype = torch.bfloat16
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(
                f"QuantConfig.blocksize must be a power of two in 32..4096, got {self.blocksize!r}"
            )
        self.compute_dtype = _as_dtype(self.compute_dtype, "QuantConfig.compute_dtype")
        if isinstance(self.skip_modules, str):
            self.skip_modules = [self.skip_modules]
        self.skip_modules = list(self.skip_modules or [])

    def skips(self, module_name: str) -> bool:
        """Whether ``module_name`` stays in full precision."""
        return any(module_name == s or module_name.endswith("." + s) for s in self.skip_modules)

    def resolved(self, dtype: torch.dtype) -> QuantConfig:
        """This config with an ``"auto"`` compute dtype replaced by ``dtype`` (the model's)."""
        return replace(self, compute_dtype=dtype) if self.compute_dtype == "auto" else self

    def to_dict(self) -> dict:
        """The plain form, as a YAML config writes it (the compute dtype by name)."""
        return {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "compute_dtype": dtype_name(self.compute_dtype),
            "skip_modules": list(self.skip_modules),
        }

    def to_transformers(self) -> dict:
        """The ``quantization_config`` transformers writes into ``config.json`` for bitsandbytes 4-bit."""
        if self.compute_dtype == "auto":
            raise ValueError("QuantConfig.compute_dtype 'auto' must be resolved before it is saved")
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }

    @classmethod
    def from_transformers(cls, qc: dict) -> QuantConfig:
        """Read a transformers ``quantization_config`` (bitsandbytes 4-bit only)."""
        method = qc.get("quant_method")
        if method != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            raise ValueError(f"quantization_config: only bitsandbytes 4-bit is supported, got {qc!r}")
        return cls(
            quant_type=qc.get("bnb_4bit_quant_type", "fp4"),
            blocksize=64,  # the checkpoint's own quant state carries the real blocksize
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=qc.get("bnb_4bit_compute_dtype") or "float32",
            skip_modules=qc.get("llm_int8_skip_modules") or [],
        )
