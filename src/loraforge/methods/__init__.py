"""Parameter-efficient methods besides LoRA, each in its own module, behind one small interface.

A method module (``ia3``, ``bottleneck``, ``prompt``) defines its config class(es) and four
functions; ``injection.inject``, ``adapter_files`` and ``loraforge.adapters`` call them and do the
rest (names, the registry, freezing, trainable flags, file checks, rollback) as for LoRA:

    CONFIGS: tuple of config classes, each a dataclass with class attributes ``peft_type`` (the
        ``adapter_config.json`` value, PEFT's where PEFT has the method) and ``method`` (the word
        ``TrainConfig.method`` uses), and ``from_dict`` / ``to_dict`` / ``from_peft_dict`` /
        ``to_peft_dict(target_modules=None, **extra)`` like ``LoraConfig``'s.
    find_targets(model, cfg) -> list[str]: the module paths the adapter wraps or hooks (ValueError
        naming what exists when nothing matches); nothing changes.
    inject(model, cfg, adapter, targets) -> None: add the adapter's holders (``layers.AdapterLayer``
        subclasses) or extend existing ones; parameters as ordinary ``nn.Parameter`` s.
    expected_shapes(model, cfg, targets) -> dict[file key, shape]: what a file for ``cfg`` on this
        model must hold (checked before the model changes).
    live_tensors(model, adapter) -> dict[file key, tensor] (optional): the adapter's live tensors
        by file key, where they are not simply ``base_model.model.<holder path>.<param path>``.

Config classes are found by ``peft_type``; modules load on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..config import LoraConfig

# peft_type -> the module that implements it.
MODULES = {
    "IA3": "loraforge.methods.ia3",
    "BOTTLENECK": "loraforge.methods.bottleneck",
    "PREFIX_TUNING": "loraforge.methods.prompt",
    "PROMPT_TUNING": "loraforge.methods.prompt",
    "P_TUNING": "loraforge.methods.prompt",
}


def _module(peft_type: str, source: str) -> ModuleType:
    name = MODULES.get(peft_type)
    if name is None:
        known = ", ".join(["LORA", *MODULES])
        raise ValueError(f"{source}: peft_type {peft_type!r} is not one loraforge loads ({known})")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ValueError(f"{source}: peft_type {peft_type!r} is not built yet in loraforge") from None


def config_class(peft_type: str, source: str = "config") -> type:
    """The config class for a ``peft_type`` value ("LORA" -> ``LoraConfig``)."""
    if peft_type == "LORA":
        return LoraConfig
    module = _module(peft_type, source)
    return next(c for c in module.CONFIGS if c.peft_type == peft_type)


def config_from_peft_dict(data: dict[str, Any], source: str = "adapter_config.json"):
    """The config an ``adapter_config.json`` describes, by its ``peft_type`` (LoRA when absent)."""
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise ValueError(f"{source}: peft_type must be a string, got {peft_type!r}")
    return config_class(peft_type, source).from_peft_dict(data, source=source)


def method_of(cfg: Any) -> ModuleType:
    """The module implementing a non-LoRA config."""
    peft_type = getattr(type(cfg), "peft_type", None)
    if not isinstance(peft_type, str) or peft_type == "LORA" or peft_type not in MODULES:
        raise TypeError(f"not an adapter config loraforge knows: {type(cfg).__name__}")
    module = _module(peft_type, type(cfg).__name__)
    if type(cfg) not in module.CONFIGS:
        raise TypeError(f"not an adapter config loraforge knows: {type(cfg).__name__}")
    return module


def is_config(cfg: Any) -> bool:
    """Whether ``cfg`` is an adapter config of any method."""
    if isinstance(cfg, LoraConfig):
        return True
    try:
        method_of(cfg)
    except TypeError:
        return False
    return True


__all__ = ["MODULES", "config_class", "config_from_peft_dict", "is_config", "method_of"]
