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
    merged_adapters,
    set_adapter,
    set_compute,
    unload,
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
    "merged_adapters",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "set_compute",
    "unload",
    "unmerge",
]

# QLoRA, model I/O and training pull in heavier imports (transformers, datasets); they load on
# first use so that `import loraforge` stays cheap.
_LAZY = {
    "quant": ("loraforge.quant", None),
    "QuantConfig": ("loraforge.quant", "QuantConfig"),
    "quantize": ("loraforge.quant", "quantize"),
    "Linear4bit": ("loraforge.quant", "Linear4bit"),
    "load_model": ("loraforge.hf", "load_model"),
    "save_model": ("loraforge.hf", "save_model"),
    "train": ("loraforge.training", "train"),
    "TrainConfig": ("loraforge.training", "TrainConfig"),
    "build_optimizer": ("loraforge.optim", "build_optimizer"),
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
