"""LoRA on ``nn.Conv2d``."""

from __future__ import annotations

import torch
from torch import nn

from .base import LoraLayer, lora_dtype


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A is a conv (in → r) with the base's kernel, stride and padding,
    B a 1×1 conv (r → out). ΔW (out × in × kh × kw) = s · B ∘ A."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError("LoRA on grouped Conv2d is not supported")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """A (r × in × kh × kw), B (out × r × 1 × 1)."""
        return {
            "lora_A.weight": (r, base.in_channels, *base.kernel_size),
            "lora_B.weight": (base.out_channels, r, 1, 1),
        }

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        kw = {"device": base.weight.device, "dtype": lora_dtype(base.weight)}
        self.lora_A[name] = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **kw
        )
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=False, **kw)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
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
