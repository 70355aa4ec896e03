"""What every adapter-holding module shares, whatever the method (LoRA, IA3, bottleneck, prompts).

A holder keeps, per adapter name, that adapter's parameters in containers named by
``adapter_param_names`` (``nn.ModuleDict`` / ``nn.ParameterDict`` keyed by the adapter name), and
the state the model-level functions switch: which adapters are active, which are merged, whether
all are disabled, one adapter per batch row (``batch_adapters``) or per token (``token_plan``).
``loraforge.adapters`` (switch, disable, merge, delete, mixed batches), ``injection.set_trainable``
and ``adapter_files`` work on any holder through this interface only; the maths is the subclass's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kinds import replace_module


class AdapterLayer(nn.Module):
    """Per-adapter bookkeeping around a frozen ``base_layer`` (None for a holder that wraps no
    module, e.g. prompt learning's virtual tokens).

    Subclasses set ``adapter_param_names`` and ``method`` (a word for messages), implement
    ``adapters``, ``add`` and the forward, and override ``merge`` / ``unmerge`` where the maths
    allows merging.
    """

    adapter_param_names: tuple[str, ...] = ()
    method = "adapter"
    # Why this method's adapters cannot be folded into the base weights (None: they can).
    cannot_merge: str | None = None

    def __init__(self, base_layer: nn.Module | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapters: list[str] | None = None  # one adapter name per batch row, or None
        self.token_plan = None  # a tokens.TokenPlan: one adapter per token (serving), or None

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters this holder has parameters for."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove one adapter's parameters (unmerging it first)."""
        if name in self.merged_adapters:
            self.unmerge(name)
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def live_adapters(self) -> list[str]:
        """The active adapters that this holder has and that are not merged: those the forward applies."""
        return [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]

    def params_of(self, name: str) -> list[nn.Parameter]:
        """One adapter's parameters (those ``set_trainable`` switches)."""
        out = []
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                out += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        return out

    # -- merge -------------------------------------------------------------------------------
    # A mergeable holder implements ``_merge_from_base(names)`` (the base ← W0 with ``names``
    # folded in, keeping what gives W0 back) and ``_restore_base()`` (W0 again, bit for bit; returns
    # the adapters whose parameters changed while merged). Merging or unmerging one adapter of
    # several restores W0 and merges the others again, so the base never accumulates rounding.
    def merge(self, name: str | list[str]) -> None:
        """Fold the adapter(s) into the base weights; idempotent (merged ones are skipped)."""
        if self.cannot_merge:
            raise TypeError(
                f"{self.method} adapters cannot be merged into the base weights ({self.cannot_merge})"
            )
        new = self.to_merge(name)
        if not new:
            return
        keep = list(self.merged_adapters)
        self._restore_base()
        self._merge_from_base(keep + new)

    def to_merge(self, name: str | list[str]) -> list[str]:
        """The adapters among ``name`` that a merge would add (not merged yet); KeyError for one
        this holder does not have (subclasses add their refusals: nothing changes)."""
        names = [name] if isinstance(name, str) else list(name)
        for n in names:
            if n not in self.adapters:
                raise KeyError(n)
        return [n for n in dict.fromkeys(names) if n not in self.merged_adapters]

    def unmerge(self, name: str | None = None) -> list[str]:
        """Take merged adapter(s) (default: all) out of the base weights, which then equal their
        values before the merge bit for bit. Returns the adapters whose parameters changed while
        merged (the merged weights carried their values from merge time)."""
        if not self.merged_adapters or (name is not None and name not in self.merged_adapters):
            return []
        keep = [] if name is None else [n for n in self.merged_adapters if n != name]
        changed = self._restore_base()
        if keep:
            self._merge_from_base(keep)
        return changed

    def _merge_from_base(self, names: list[str]) -> None:
        raise NotImplementedError

    def _restore_base(self) -> list[str]:
        raise NotImplementedError

    def check_merged_training(self) -> None:
        """Refuse to train an adapter whose copy in the base weights gradients would not reach."""
        if self.training and torch.is_grad_enabled():
            for n in self.merged_adapters:
                if any(p.requires_grad for p in self.params_of(n)):
                    raise RuntimeError(
                        f"adapter {n!r} is merged into the base weights; call lf.unmerge(model) before "
                        "training it (gradients would not reach the merged copy)"
                    )

    # -- surgery -----------------------------------------------------------------------------
    def unwrap(self, model: nn.Module, path: str) -> None:
        """Put the base module back at ``path`` (called once no adapter is left here)."""
        replace_module(model, path, self.base_layer)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}, merged={self.merged_adapters}"
