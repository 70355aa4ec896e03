"""Modules trained in full next to the adapters (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .tokens import tokens_first


class ModulesToSave(nn.Module):
    """A module trained in full (e.g. a classification head): one trainable copy per adapter.

    ``original_module`` stays frozen and answers when adapters are disabled or for BASE rows.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.batch_adapters: list[str] | None = None
        self.token_plan = None  # a tokens.TokenPlan (serving): one adapter per token

    def add(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already exists on this module")
        clone = copy.deepcopy(self.original_module).train(self.training)  # this wrapper's mode
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    def _forward_tokens(self, x: torch.Tensor, *args, **kwargs):
        """Each token of a serving step through its adapter's copy (see ``tokens.py``)."""
        plan = self.token_plan
        out = self.original_module(x, *args, **kwargs).clone()
        groups = plan.groups(tuple(self.modules_to_save), x.device)
        if groups is None:
            return out
        flat = tokens_first(out, plan.num_tokens)
        for name, rows in groups.rows.items():
            mine = tokens_first(self.modules_to_save[name](x, *args, **kwargs), plan.num_tokens)
            flat[rows] = mine.index_select(0, rows).to(flat.dtype)
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.token_plan is not None and self.token_plan.active:
            return self._forward_tokens(x, *args, **kwargs)
        if self.batch_adapters is not None:
            names = self.batch_adapters
            out = self.original_module(x, *args, **kwargs).clone()
            for n in sorted(set(names)):
                if n in self.modules_to_save:
                    rows = torch.tensor([i for i, m in enumerate(names) if m == n], device=x.device)
                    out[rows] = self.modules_to_save[n](x[rows], *args, **kwargs)
            return out
        active = [a for a in self.active_adapters if a in self.modules_to_save]
        if len(active) > 1:
            warnings.warn("several active adapters have modules_to_save; using the first", stacklevel=2)
        if not active:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[active[0]](x, *args, **kwargs)
