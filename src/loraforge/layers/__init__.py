"""LoRA wrappers around frozen base layers.

Every wrapper keeps the original module as ``base_layer`` and holds, per adapter name, the
low-rank factors ``A`` (r × in) and ``B`` (out × r). The adapted layer computes

    h = base_layer(x) + Σ_active  s · B·(A·dropout(x)),     s = alpha / r   (or alpha / √r)

right to left, so the (out × in) product B·A is only ever formed to merge it into the base.
Parameter names follow PEFT (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``) so that
files map one to one onto PEFT's.

The base may be ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored in × out), a 4-bit
linear (anything ``loraforge.kinds.is_4bit`` recognises), ``nn.Embedding``, ``nn.Conv1d`` /
``nn.Conv2d`` / ``nn.Conv3d`` (grouped too) or ``nn.MultiheadAttention`` (``mha.py``). LoRA
does not know how the base stores its weight: ``base_weight()`` and ``_add_to_base()`` are the
only places that look.

A DoRA adapter (``LoraConfig(use_dora=True)``) also has a magnitude per output channel
(``lora_magnitude_vector``) that rescales the layer's output: see ``dora.py``.
"""

from __future__ import annotations

from torch import nn

from ..kinds import is_4bit, is_conv1d
from .adapter import AdapterLayer
from .base import BASE, COMPUTE_MODES, LoraLayer
from .conv import CONV_WRAPPERS, LoraConv, LoraConv1d, LoraConv2d, LoraConv3d
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .mha import LoraMultiheadAttention
from .modules_to_save import ModulesToSave

__all__ = [
    "AdapterLayer",
    "BASE",
    "COMPUTE_MODES",
    "LoraConv",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "ModulesToSave",
    "is_linear_like",
    "wrap",
    "wrapper_class",
]


def wrap(module: nn.Module) -> LoraLayer:
    """A LoRA wrapper around a base module, or a clear error for an unsupported type."""
    return wrapper_class(module)(module)


def wrapper_class(module: nn.Module) -> type[LoraLayer]:
    """The LoRA wrapper class for a base module, or a clear error for an unsupported type."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    for conv, wrapper in CONV_WRAPPERS.items():
        if isinstance(module, conv):
            return wrapper
    if isinstance(module, nn.MultiheadAttention):
        return LoraMultiheadAttention
    if is_linear_like(module):
        return LoraLinear
    raise TypeError(
        f"LoRA supports nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention, GPT-2 Conv1D "
        f"and 4-bit linears; "
        f"got {type(module).__name__}"
    )


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers "all-linear" targets (Linear, Conv1D, 4-bit linear)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_4bit(module)
