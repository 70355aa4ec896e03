"""LoRA wrappers around frozen base layers.

Every wrapper keeps the original module as ``base_layer`` and holds, per adapter name, the
low-rank factors ``A`` (r × in) and ``B`` (out × r). The adapted layer computes

    h = base_layer(x) + Σ_active  s · B·(A·dropout(x)),     s = alpha / r   (or alpha / √r)

right to left, so the (out × in) product B·A is only ever formed to merge it into the base.
Parameter names follow PEFT (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``) so that
files map one to one onto PEFT's.

The base may be ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored in × out), a 4-bit
linear (anything with ``in_features``/``out_features``/``dequantize()``), ``nn.Embedding`` or
``nn.Conv2d``. LoRA does not know how the base stores its weight: ``base_weight()`` and
``_add_to_base()`` are the only places that look.
"""

from __future__ import annotations

from torch import nn

from .base import BASE, COMPUTE_MODES, LoraLayer, _is_conv1d, _is_quantized
from .conv import LoraConv2d
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .modules_to_save import ModulesToSave

__all__ = [
    "BASE",
    "COMPUTE_MODES",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSave",
    "is_linear_like",
    "wrap",
]


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper class for a base module, or a clear error for an unsupported type."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    if is_linear_like(module):
        return LoraLinear(module)
    raise TypeError(
        f"LoRA supports nn.Linear, nn.Embedding, nn.Conv2d, GPT-2 Conv1D and 4-bit linears; "
        f"got {type(module).__name__}"
    )


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers "all-linear" targets (Linear, Conv1D, 4-bit linear)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or _is_quantized(module)
