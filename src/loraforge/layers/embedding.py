"""LoRA on ``nn.Embedding`` (PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer, factor_device, lora_dtype


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: row lookup in Aᵀ (num × r), then B (dim × r).

    Parameters are stored as PEFT does: ``lora_embedding_A[name]`` (r × num_embeddings) and
    ``lora_embedding_B[name]`` (embedding_dim × r); ΔW = s · (B·A)ᵀ (num × dim).
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")
    stores_transposed = True  # the (num × dim) table is ΔW's (in × out) layout

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """A (r × num_embeddings), B (embedding_dim × r)."""
        num, dim = base.weight.shape
        return {"lora_embedding_A": (r, num), "lora_embedding_B": (dim, r)}

    def _create(self, name: str, r: int) -> None:
        w = self.base_layer.weight
        kw = {"device": factor_device(w), "dtype": lora_dtype(w)}
        num, dim = w.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r, **kw))

    def reset(self, name: str, init: str) -> None:
        a, b = self.factors(name)
        with torch.no_grad():
            # PEFT's embedding init: A = 0, B ~ N(0, 1) — ΔW starts at zero all the same; with
            # init=False both A and B ~ N(0, 1). ("olora" is not PEFT's on embeddings: this init too.)
            # PEFT draws A, B ~ N(0, 1) when it creates them, whatever the init: drawn here too, so
            # that the global generator (DARE merges' draws, later inits) moves as under PEFT.
            nn.init.normal_(a)
            nn.init.normal_(b)
            if init is not False:
                nn.init.zeros_(a)
                nn.init.normal_(b)
        if init == "pissa":
            self._init_pissa(name)

    @classmethod
    def check(cls, base: nn.Module, cfg, r: int) -> None:
        if cfg.lora_bias:
            raise ValueError("lora_bias is not supported on nn.Embedding (nor in PEFT)")

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        return ((b.float() * scaling) @ a.float()).T

    def _ba_layout(self, w: torch.Tensor) -> torch.Tensor:
        return w.T  # B·A is (dim × num): the transpose of the (num × dim) table

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return (self._embed(x, a.T) @ b.T) * self.scaling[name]

    def _forward_mixed(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        uniq, idx = self._row_index(names, x.shape[0], x.device)
        if len(uniq) == 1:
            return result
        r_max = max(self.r[n] for n in uniq[1:])
        a0 = self.factors(uniq[1])[0]
        num, dim = self.base_layer.weight.shape
        a_stack = a0.new_zeros((len(uniq), num, r_max))
        b_stack = a0.new_zeros((len(uniq), dim, r_max))
        for i, n in enumerate(uniq[1:], start=1):
            a, b = self.factors(n)
            a_stack[i, :, : self.r[n]] = a.T
            b_stack[i, :, : self.r[n]] = b * self.scaling[n]
        ids = x.reshape(x.shape[0], -1)  # (batch, tokens)
        low = a_stack[idx[:, None], ids]  # (batch, tokens, r_max): each row looks up its own table
        delta = torch.bmm(low, b_stack[idx].transpose(1, 2))
        return result + delta.reshape(result.shape).to(result.dtype)
