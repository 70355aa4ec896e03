"""The (IA)³ holder: learned vectors that rescale a frozen layer's input or output.

For a base map y = W·x + b (W: out × in) and an adapter's vector l, the adapted layer computes

    feed-forward target:  y = W·(l ⊙ x) + b       l: (1, in)   — W's columns scaled
    other targets:        y = l ⊙ (W·x + b)       l: (out, 1)  — W's rows and b scaled

(Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"; PEFT's shapes, so files map one to one). Several active adapters multiply. On a
``Conv2d`` / ``Conv3d`` the vector is (1, channels, 1, …) and scales input or output channels.

Merging multiplies W (and b) by the vectors: W1 = round(W0 ⊙ l). Dividing again does not give W0
back wherever the product rounded (or l held a zero), so merge keeps what ``layers.merge`` keeps
for LoRA: the vectors as merged, and W0's values where round(W1 ⊘ l) misses them; unmerge is then
exact bit for bit. On a 4-bit base the scaled weight is requantized (the packed weight is kept and
put back on unmerge), as a LoRA merge there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kinds import is_4bit, is_conv1d
from ..layers import AdapterLayer
from ..layers.base import BASE, lora_dtype
from ..layers.merge import add_exactly, restore_quantized, snapshot_quantized, subtract_exactly

SUPPORTED = "nn.Linear, GPT-2 Conv1D, 4-bit linears, nn.Conv2d and nn.Conv3d"


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)) or is_conv1d(module) or is_4bit(module)


def features(base: nn.Module) -> tuple[int, int]:
    """(in, out) features (channels for a convolution) of a supported base layer."""
    if isinstance(base, (nn.Conv2d, nn.Conv3d)):
        return base.in_channels, base.out_channels
    if is_conv1d(base):
        fin, fout = base.weight.shape  # GPT-2's Conv1D stores (in × out)
        return fin, fout
    if isinstance(base, nn.Linear) or is_4bit(base):
        return base.in_features, base.out_features
    raise TypeError(f"(IA)³ supports {SUPPORTED}; got {type(base).__name__}")


def vector_shape(base: nn.Module, feedforward: bool) -> tuple[int, ...]:
    """The shape of ``ia3_l`` on ``base``: (1, in) for a feed-forward target, else (out, 1);
    (1, channels, 1, …) on a convolution."""
    fin, fout = features(base)
    if isinstance(base, (nn.Conv2d, nn.Conv3d)):
        return (1, fin if feedforward else fout) + (1,) * (base.weight.dim() - 2)
    return (1, fin) if feedforward else (fout, 1)


class IA3Layer(AdapterLayer):
    """(IA)³ around one frozen layer: per adapter a vector ``ia3_l[name]`` and whether it scales
    the input (feed-forward) or the output."""

    adapter_param_names = ("ia3_l",)
    method = "IA3"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = features(base_layer)
        self.is_conv = isinstance(base_layer, (nn.Conv2d, nn.Conv3d))
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.merge_error: dict[str, float] = {}  # mean |error| of a requantizing merge (4-bit)

    @property
    def adapters(self) -> list[str]:
        return list(self.ia3_l)

    def add(self, name: str, feedforward: bool, init: bool = True) -> None:
        """A new vector: ones (the base's output exactly) or, with ``init=False``, N(0, 1) values
        (PEFT's ``init_ia3_weights=False``, for tests)."""
        if name in self.ia3_l:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.base_layer.weight
        shape = vector_shape(self.base_layer, feedforward)
        vec = torch.ones(shape) if init else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(vec.to(device=w.device, dtype=lora_dtype(w)))
        self.feedforward[name] = feedforward
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete(self, name: str) -> None:
        super().delete(name)
        self.feedforward.pop(name, None)
        self.merge_error.pop(name, None)

    # -- forward -----------------------------------------------------------------------------
    def _flat(self, v: torch.Tensor) -> torch.Tensor:
        """A vector as it broadcasts against activations: (features,) on the last dimension of a
        linear map's, (1, channels, 1, …) on a convolution's channel dimension."""
        return v if self.is_conv else v.reshape(-1)

    def _product(self, names: list[str], feedforward: bool) -> torch.Tensor | None:
        out = None
        for n in names:
            if self.feedforward[n] == feedforward:
                v = self._flat(self.ia3_l[n])
                out = v if out is None else out * v
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            if self.merged_adapters:
                raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call lf.unmerge(model)")
            return self._forward_mixed(x, self.batch_adapters, *args, **kwargs)
        self.check_merged_training()
        live = self.live_adapters()
        scale_in, scale_out = self._product(live, True), self._product(live, False)
        if scale_in is not None:
            x = (x * scale_in).to(x.dtype)  # (in the wider of the two dtypes, rounded once)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result * scale_out).to(result.dtype)
        return result

    def _forward_mixed(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        """Row i scaled by ``names[i]``'s vector (ones for BASE and for adapters not on this layer)."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_batch got {len(names)} names for a batch of {x.shape[0]} rows")
        scale_in = self._row_scales(names, True, x)
        if scale_in is not None:
            x = (x * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        scale_out = self._row_scales(names, False, result)
        if scale_out is not None:
            result = (result * scale_out).to(result.dtype)
        return result

    def _row_scales(self, names: list[str], feedforward: bool, t: torch.Tensor) -> torch.Tensor | None:
        """(batch, …) factors for ``t``: each row's vector, shaped to broadcast over that row."""
        mine = sorted({n for n in names if n in self.ia3_l and self.feedforward[n] == feedforward})
        if not mine:
            return None
        vectors = [self.ia3_l[n].reshape(-1) for n in mine]
        uniq = [BASE, *mine]
        stack = torch.stack([torch.ones_like(vectors[0]), *vectors])  # (unique, features)
        pos = {n: i for i, n in enumerate(uniq)}
        idx = torch.tensor([pos.get(n, 0) for n in names], device=stack.device)
        rows = stack.index_select(0, idx)  # (batch, features)
        ones = (1,) * (t.dim() - 2)
        return rows.view(rows.shape[0], *ones, -1) if not self.is_conv else rows.view(*rows.shape, *ones)

    # -- merge -------------------------------------------------------------------------------
    # (merge / unmerge: AdapterLayer's, over _merge_from_base and _restore_base: the base weight,
    # and for output vectors the bias, scaled by the adapters' vectors.)

    def nonfinite_merge(self, name: str | list[str]) -> str | None:
        """Which of the base weight / bias would hold NaN or Inf once the adapter(s) are merged
        (None: neither), computed on a copy (``lf.merge(safe=True)``)."""
        names = [name] if isinstance(name, str) else list(name)
        new = [n for n in dict.fromkeys(names) if n in self.ia3_l and n not in self.merged_adapters]
        if not new:
            return None
        factors, bias_factor = self._scales({n: self.ia3_l[n].detach() for n in new})
        base = self.base_layer
        with torch.no_grad():
            trial = base.dequantize(torch.float32) if is_4bit(base) else base.weight.detach().clone()
            self._applier(factors)(trial, 1.0)
            if not bool(torch.isfinite(trial).all()):
                return "weight"
            bias = getattr(base, "bias", None)
            if bias_factor is not None and bias is not None:
                trial = bias.detach().clone()
                self._applier([bias_factor])(trial, 1.0)
                if not bool(torch.isfinite(trial).all()):
                    return "bias"
        return None

    def _scales(self, vectors: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(factors for the stored weight, factor for the bias), fp32 (fp64 over fp64 vectors), from
        the vectors as merged: the weight is multiplied by each factor in turn (broadcast over its
        stored layout), the bias by the output factor (None: no output vector)."""
        base = self.base_layer
        dtype = torch.promote_types(next(iter(vectors.values())).dtype, torch.float32)
        prods = {}
        for ff in (False, True):
            vs = [v.reshape(-1).to(dtype) for n, v in vectors.items() if self.feedforward[n] == ff]
            if vs:
                p = vs[0].clone()
                for v in vs[1:]:
                    p.mul_(v)
                prods[ff] = p
        out, inp = prods.get(False), prods.get(True)
        nd = base.weight.dim() if not is_4bit(base) else 2
        trailing = (1,) * (nd - 2)
        factors = []
        if is_conv1d(base):  # (in × out)
            factors += [out.view(1, -1)] if out is not None else []
            factors += [inp.view(-1, 1)] if inp is not None else []
            return factors, out
        if out is not None:  # (out × in …): rows
            factors.append(out.view(-1, 1, *trailing))
        if inp is not None:
            if self.is_conv and base.groups > 1:  # W[o, j] is input channel g(o)·in_per_group + j
                g = base.groups
                per_in, per_out = base.in_channels // g, base.out_channels // g
                inp = inp.view(g, 1, per_in).expand(g, per_out, per_in).reshape(base.out_channels, per_in)
                factors.append(inp.view(*inp.shape, *trailing))
            else:
                factors.append(inp.view(1, -1, *trailing))
        return factors, out

    @staticmethod
    def _applier(factors: list[torch.Tensor]):
        """``apply(t, sign)``: t ← t ⊙ Π factors (sign > 0) or t ⊘ Π factors (in reverse), in place,
        computed in the factors' precision and rounded once to t's dtype; the same operations
        every time, so that ``layers.merge`` can record what unmerge misses."""

        def apply(t: torch.Tensor, sign: float) -> None:
            wide = t.to(factors[0].dtype)
            for f in factors if sign > 0 else reversed(factors):
                f = f.to(t.device)
                wide = wide * f if sign > 0 else wide / f
            t.copy_(wide.to(t.dtype))

        return apply

    def _merge_from_base(self, names: list[str]) -> None:
        vectors = {n: self.ia3_l[n].detach().clone() for n in names}
        factors, bias_factor = self._scales(vectors)
        base = self.base_layer
        weight_record = bias_record = None
        if is_4bit(base):
            weight_record = snapshot_quantized(base, {})
            scaled = self._applier(factors)
            w = base.dequantize(torch.float32)
            scaled(w, 1.0)
            error = float(base.requantize_(w))
            for n in names:
                self.merge_error[n] = error
        else:
            weight_record = add_exactly(base.weight, self._applier(factors), {}, base.weight.device)
        bias = getattr(base, "bias", None)
        if bias_factor is not None and bias is not None:
            bias_record = add_exactly(bias, self._applier([bias_factor]), {}, bias.device)
        self._merge_record = (vectors, factors, bias_factor, weight_record, bias_record)
        self.merged_adapters = list(names)

    def _restore_base(self) -> list[str]:
        """Put W0 (and b0) back exactly; returns the merged adapters whose live vectors differ
        from the merged ones."""
        record = self.__dict__.pop("_merge_record", None)
        merged, self.merged_adapters = self.merged_adapters, []
        if record is None:
            return []
        vectors, factors, bias_factor, weight_record, bias_record = record
        base, where = self.base_layer, type(self.base_layer).__name__
        if is_4bit(base):
            restore_quantized(base, weight_record)
        else:
            subtract_exactly(base.weight, self._applier(factors), weight_record, base.weight.device, where)
        if bias_record is not None:
            subtract_exactly(base.bias, self._applier([bias_factor]), bias_record, base.bias.device, where)
        return [
            n
            for n in merged
            if n in self.ia3_l and not torch.equal(vectors[n], self.ia3_l[n].detach().to(vectors[n].device))
        ]

    def extra_repr(self) -> str:
        ff = [n for n, f in self.feedforward.items() if f]
        return super().extra_repr() + (f", feedforward={ff}" if ff else "")
