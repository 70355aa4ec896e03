"""The adapters a model holds: one small registry per model, the single owner of that state.

``inject`` adds to it, ``adapters`` switches and deletes through it, ``adapter_files`` reads
it and puts it back when a load fails. The LoRA factors themselves live in the layers (``loraforge.layers``);
the registry holds only what no layer knows: each adapter's config, the module paths it wraps,
and which adapters are active (summed in the forward, trainable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import LoraConfig
from .layers import BASE

# Where the registry sits: a plain attribute in the model's __dict__ (not a submodule, so not in
# state_dict and not moved by .to(); copy.deepcopy(model) copies it with the model).
ATTR = "_lf_registry"


@dataclass
class AdapterRegistry:
    """Configs, targets and the active list of one model's adapters, in the order added."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)  # name -> its config
    targets: dict[str, list[str]] = field(default_factory=dict)  # name -> the module paths it wraps
    active: list[str] = field(default_factory=list)  # the adapters the forward sums (and trains)

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def __contains__(self, name: object) -> bool:
        return name in self.configs

    def check_known(self, names: str | list[str], allow_base: bool = False) -> list[str]:
        """``names`` as a list; ValueError when there is no adapter at all, KeyError naming the
        unknown ones and the known ones otherwise (``allow_base``: BASE counts as known)."""
        names = [names] if isinstance(names, str) else list(names)
        if not self.configs:
            raise ValueError("the model has no LoRA adapter; call lf.inject(model, cfg) first")
        bad = [n for n in names if n not in self.configs and not (allow_base and n == BASE)]
        if bad:
            extra = f" (or {BASE!r} for the base model)" if allow_base else ""
            raise KeyError(f"unknown adapter(s) {bad}; known adapters: {sorted(self.configs)}{extra}")
        return names

    def add(self, name: str, cfg: LoraConfig, targets: list[str]) -> None:
        """Record a new adapter; the first one becomes the active one."""
        if not self.configs:
            self.active = [name]
        self.configs[name] = cfg
        self.targets[name] = list(targets)

    def remove(self, name: str) -> None:
        """Forget an adapter; when no active one is left, the first remaining becomes active."""
        del self.configs[name]
        self.targets.pop(name, None)
        remaining = [a for a in self.active if a != name]
        if not remaining and self.configs:
            remaining = [next(iter(self.configs))]
        self.active = remaining

    def activate(self, names: list[str]) -> None:
        """Make ``names`` (checked by the caller with :meth:`check_known`) the active adapters."""
        self.active = list(names)

    def snapshot(self) -> AdapterRegistry:
        """A copy to :meth:`restore` later (configs are immutable in use: shared, not copied)."""
        targets = {name: list(paths) for name, paths in self.targets.items()}
        return AdapterRegistry(dict(self.configs), targets, list(self.active))

    def restore(self, snapshot: AdapterRegistry) -> None:
        """Put back the state of a :meth:`snapshot`."""
        saved = snapshot.snapshot()  # (a copy: the snapshot stays valid for another restore)
        self.configs, self.targets, self.active = saved.configs, saved.targets, saved.active


def registry(model: nn.Module) -> AdapterRegistry:
    """The model's adapter registry (an empty one is created on first use)."""
    reg = model.__dict__.get(ATTR)
    if reg is None:
        reg = model.__dict__[ATTR] = AdapterRegistry()
    return reg


def drop_registry(model: nn.Module) -> None:
    """Remove the registry from the model (after its adapters were unloaded)."""
    model.__dict__.pop(ATTR, None)


__all__ = ["AdapterRegistry", "drop_registry", "registry"]
