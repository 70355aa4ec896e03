"""LoRA on ``nn.MultiheadAttention``: on the packed q/k/v projection and on the output projection."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .base import LoraLayer, lora_dtype
from .merge import add_exactly, snapshot_factors, subtract_exactly

# The out-projection factors' names as PEFT files name them (PEFT wraps ``out_proj`` in a LoRA
# Linear inside the attention module); here they live on the wrapper, and these names reach them.
_OUT = {"base_layer.out_proj.lora_A": "out_proj_lora_A", "base_layer.out_proj.lora_B": "out_proj_lora_B"}


class LoraMultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention`` (q, k, v of one embedding size E, as PEFT requires).

    Two adapted weights per adapter, as PEFT's ``MultiheadAttention`` layer:
    ``in_proj_weight`` (3E × E) + s·B·A with A (r × E), B (3E × r) (``lora_A`` / ``lora_B``),
    and ``out_proj.weight`` (E × E) + s·B'·A' with A' (r × E), B' (E × r), which PEFT's files
    name ``base_layer.out_proj.lora_A`` / ``lora_B``. The attention reads its projection weights
    directly (no ``nn.Linear`` forward to hook), so the forward runs the base module with
    W0 + ΔW in place of each weight (formed from the live factors: gradients reach A and B).
    For the same reason LoRA dropout does not apply here (as in PEFT), nor mixed-adapter
    batches (refused, as in PEFT).
    """

    adapter_param_names = ("lora_A", "lora_B", *_OUT)

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.out_proj_lora_A = nn.ModuleDict()
        self.out_proj_lora_B = nn.ModuleDict()

    def __getattr__(self, name: str):
        return super().__getattr__(_OUT.get(name, name))

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """A (r × E), B (3E × E); out-projection A' (r × E), B' (E × r)."""
        e = base.embed_dim
        return {
            "lora_A.weight": (r, e),
            "lora_B.weight": (3 * e, r),
            "base_layer.out_proj.lora_A.weight": (r, e),
            "base_layer.out_proj.lora_B.weight": (e, r),
        }

    @classmethod
    def check(cls, base: nn.Module, cfg, r: int) -> None:
        if not base._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs kdim = vdim = embed_dim (as in PEFT)")
        for key, used in (("lora_bias", cfg.lora_bias), ("use_dora", cfg.use_dora)):
            if used:
                raise ValueError(f"{key} is not supported on nn.MultiheadAttention (nor in PEFT)")
        if cfg.init in ("pissa", "olora"):
            raise ValueError(f"init={cfg.init!r} is not supported on nn.MultiheadAttention (nor in PEFT)")

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        w, e = base.in_proj_weight, base.embed_dim
        kw = {"device": w.device, "dtype": lora_dtype(w)}
        # (out_proj's first: PEFT's order, so that init=False draws PEFT's values under one seed)
        self.out_proj_lora_A[name] = nn.Linear(e, r, bias=False, **kw)
        self.out_proj_lora_B[name] = nn.Linear(r, e, bias=False, **kw)
        self.lora_A[name] = nn.Linear(e, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, 3 * e, bias=False, **kw)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def out_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') of the output projection."""
        return self.out_proj_lora_A[name].weight, self.out_proj_lora_B[name].weight

    def reset(self, name: str, init: str | bool) -> None:
        if init is False:
            return super().reset(name, init)
        for a, b in (self.factors(name), self.out_factors(name)):
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(a, std=1.0 / self.r[name])
                else:
                    nn.init.kaiming_uniform_(a, a=5**0.5)
                nn.init.zeros_(b)

    # -- weights: ``base_weight`` / ``delta_weight`` are the in-projection's ------------------
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def base_weight_shape(self) -> tuple[int, ...]:
        return tuple(self.base_layer.in_proj_weight.shape)

    def _delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        return (b.float() * scaling) @ a.float()  # (either projection: both are plain matrices)

    def out_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW' = s · B'·A' (E × E) of the output projection."""
        return self._delta(*self.out_factors(name), self.scaling[name])

    def _out_snapshot(self, names: list[str]) -> dict:
        return {n: (*(t.detach().clone() for t in self.out_factors(n)), self.scaling[n]) for n in names}

    # -- merge: both weights, each exactly as LoraLayer merges its one -------------------------
    def _merge_from_base(self, names: list[str]) -> None:
        base = self.base_layer
        f_in, f_out = snapshot_factors(self, names), self._out_snapshot(names)
        device = next(iter(f_in.values()))[0].device
        record = add_exactly(base.in_proj_weight, self._applier(f_in), f_in, device)
        self.__dict__["_out_record"] = add_exactly(base.out_proj.weight, self._applier(f_out), f_out, device)
        self._merge_record = record
        self.merged_adapters = list(names)

    def _restore_base(self) -> list[str]:
        base = self.base_layer
        record = self.__dict__.pop("_merge_record", None)
        out = self.__dict__.pop("_out_record", None)
        if record is None:
            with torch.no_grad():
                for n in reversed(self.merged_adapters):
                    base.in_proj_weight.sub_(self.delta_weight(n).to(base.in_proj_weight.dtype))
                    base.out_proj.weight.sub_(self.out_delta_weight(n).to(base.out_proj.weight.dtype))
            self.merged_adapters = []
            return []
        device = next(iter(record.factors.values()))[0].device
        where = "MultiheadAttention"
        subtract_exactly(base.in_proj_weight, self._applier(record.factors), record, device, where)
        subtract_exactly(base.out_proj.weight, self._applier(out.factors), out, device, where)
        self.merged_adapters = []
        return [n for n in record.factors if n in self.r and not self._same_both(n, record, out)]

    def _same_both(self, name: str, record, out) -> bool:
        same_out = all(
            torch.equal(x.to(y.device), y) for x, y in zip(out.factors[name][:2], self.out_factors(name))
        )
        return same_out and self._same_factors(name, *record.factors[name])

    def nonfinite_merge(self, name: str | list[str]) -> str | None:
        new = self.to_merge(name)
        if not new:
            return None
        base = self.base_layer
        with torch.no_grad():
            for what, w, factors in (
                ("in_proj_weight", base.in_proj_weight, snapshot_factors(self, new)),
                ("out_proj.weight", base.out_proj.weight, self._out_snapshot(new)),
            ):
                trial = w.detach().clone()
                self._applier(factors)(trial, 1.0)
                if not bool(torch.isfinite(trial).all()):
                    return what
        return None

    # -- forward -----------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, *args, **kwargs):
        base = self.base_layer
        if self.disabled:
            return base(query, *args, **kwargs)
        if self.batch_adapters is not None or self._per_token():
            raise RuntimeError(
                "LoRA on nn.MultiheadAttention does not support mixed-adapter batches (nor PEFT)"
            )
        self.check_merged_training()
        live = self.live_adapters()
        if not live:
            return base(query, *args, **kwargs)
        w_in, w_out = base.in_proj_weight, base.out_proj.weight
        for n in live:
            w_in = w_in + self._branch_delta(self.factors(n), n, w_in.dtype)
            w_out = w_out + self._branch_delta(self.out_factors(n), n, w_out.dtype)
        weights = {"in_proj_weight": w_in, "out_proj.weight": w_out}
        return functional_call(base, weights, (query, *args), kwargs)

    def _branch_delta(self, factors, name: str, dtype: torch.dtype) -> torch.Tensor:
        a, b = factors
        return ((b @ a) * self.scaling[name]).to(dtype)
