"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, grouped or not (PEFT's ``_ConvNd`` layout)."""

from __future__ import annotations

import torch
from torch import nn

from .base import LoraLayer, factor_device, lora_dtype

_CONV = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}  # by the dimension of the weight


class LoraConv(LoraLayer):
    """LoRA on an N-d convolution with ``groups`` = g.

    A is a conv (in → r) with the base's kernel k, stride, padding and dilation, and no groups;
    B a kernel-1 conv (r → out) with the base's groups: weights A (r × in × k…) and
    B (out × r/g × 1…), B's bias (out) with ``lora_bias``. The branch is s · B(A(dropout(x))).

    With g = 1, ΔW (out × in × k…) = s · B·A (B as out × r, A as r × in·k…): it merges into W0.
    With g > 1 the product of a dense A and a grouped B is a dense conv, which the grouped base
    (out × in/g × k…) cannot hold: such an adapter runs unmerged only, as in PEFT, which also
    requires r divisible by g.
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """A (r × in × k…), B (out × r/groups × 1…)."""
        ones = (1,) * len(base.kernel_size)
        return {
            "lora_A.weight": (r, base.in_channels, *base.kernel_size),
            "lora_B.weight": (base.out_channels, r // base.groups, *ones),
        }

    @classmethod
    def check(cls, base: nn.Module, cfg, r: int) -> None:
        g = base.groups
        if r % g:
            raise ValueError(
                f"a {type(base).__name__} with groups={g} needs a rank divisible by {g}, got r={r}"
            )
        if g > 1 and cfg.init in ("pissa", "olora"):
            raise ValueError(
                f"init={cfg.init!r} needs a mergeable layer; a {type(base).__name__} with groups={g} is not"
            )

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        conv = _CONV[base.weight.dim()]
        kw = {"device": factor_device(base.weight), "dtype": lora_dtype(base.weight)}
        ones = (1,) * len(base.kernel_size)
        # (dilation and padding mode as the base's, so that the branch is the conv by ΔW that merges)
        self.lora_A[name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, **kw,
        )  # fmt: skip
        bias = self.lora_bias.get(name, False)
        self.lora_B[name] = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=bias, **kw)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _check_mergeable(self) -> None:
        if self.base_layer.groups > 1:
            raise ValueError(
                f"a LoRA adapter on a {type(self.base_layer).__name__} with groups={self.base_layer.groups} "
                "cannot be merged (B·A is a dense conv the grouped weight cannot hold); run it unmerged"
            )

    def to_merge(self, name: str | list[str]) -> list[str]:
        new = super().to_merge(name)
        if new:
            self._check_mergeable()
        return new

    def _delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        self._check_mergeable()
        out = b.shape[0]
        return ((b.float().reshape(out, -1) * scaling) @ a.float().reshape(a.shape[0], -1)).reshape(
            self.base_layer.weight.shape
        )

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name]
        x = self.lora_dropout[name](x.to(a.weight.dtype))
        return self.lora_B[name](a(x)) * self.scaling[name]

    def _forward_mixed(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        # Convolutions have no batched-weight kernel; loop over the (few) adapters, not the rows.
        result = self.base_layer(x, *args, **kwargs)
        uniq, idx = self._row_index(names, x.shape[0], x.device)
        result = result.clone()
        for i, n in enumerate(uniq[1:], start=1):
            rows = (idx == i).nonzero(as_tuple=True)[0]
            result[rows] = result[rows] + self._lora(x[rows], n).to(result.dtype)
        return result


class LoraConv1d(LoraConv):
    """LoRA on ``nn.Conv1d``."""


class LoraConv2d(LoraConv):
    """LoRA on ``nn.Conv2d``."""


class LoraConv3d(LoraConv):
    """LoRA on ``nn.Conv3d``."""


CONV_WRAPPERS = {nn.Conv1d: LoraConv1d, nn.Conv2d: LoraConv2d, nn.Conv3d: LoraConv3d}
