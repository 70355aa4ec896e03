"""loraforge: LoRA and QLoRA fine-tuning, and many adapters on one base model.

The public API is a set of plain functions on a plain ``torch.nn.Module``::

    import loraforge as lf
    model = lf.inject(model, lf.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    lf.save_adapter(model, "out/adapter")      # PEFT-compatible directory
"""

from .adapters import (
    adapter_batch,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    unmerge,
)
from .config import LoraConfig
from .inject import add_adapter, count_parameters, inject, print_trainable_parameters
from .io import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "adapter_batch",
    "add_adapter",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "list_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "unmerge",
]

# Exports of the QLoRA and training modules are added below as those modules land.
