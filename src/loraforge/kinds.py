"""What kind of base layer a module is: the one place that recognises a GPT-2 ``Conv1D`` and a
4-bit linear. Both are recognised by their interface, so that neither transformers nor
bitsandbytes needs to be imported (and a layer with the same interface works the same way).
Also the one way a module is swapped in a model (quantizing, wrapping, unwrapping, loading)."""

from __future__ import annotations


def is_conv1d(module: object) -> bool:
    """True for transformers' GPT-2 ``Conv1D``: a linear map whose weight is stored (in × out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_4bit(module: object) -> bool:
    """True for a 4-bit linear: ``loraforge.quant.Linear4bit`` or any layer with its interface
    (a packed ``weight``, ``quant_state``, ``dequantize()``, ``in_features`` / ``out_features``)."""
    return hasattr(module, "dequantize") and hasattr(module, "quant_state")


def replace_module(model, name: str, new):
    """Put ``new`` at dotted path ``name`` of ``model`` (in its parent, under the same name);
    returns ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return new
