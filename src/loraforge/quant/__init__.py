"""QLoRA quantization: NF4/FP4 4-bit weights with double quantization, byte-compatible with bitsandbytes.

::

    packed, state = quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=True)
    w_hat = dequantize_4bit(packed, state)
    model = quantize(model, QuantConfig(compute_dtype=torch.bfloat16))  # nn.Linear -> Linear4bit
"""

from .config import QuantConfig
from .linear4bit import Linear4bit, quantize
from .nf4 import (
    dequantize_4bit,
    dequantize_blockwise_8bit,
    dynamic_map,
    get_code,
    quantize_4bit,
    quantize_blockwise_8bit,
)
from .state import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, QuantState

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "Linear4bit",
    "QuantConfig",
    "QuantState",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "get_code",
    "quantize",
    "quantize_4bit",
    "quantize_blockwise_8bit",
]
