"""LoRA on a linear map (``nn.Linear``, GPT-2 ``Conv1D``, a 4-bit linear): the fused
base + low-rank autograd function, the in-place sum into the base output, mixed batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kinds import is_4bit, is_conv1d
from ..quant.linear4bit import Linear4bit
from . import dora
from .base import LoraLayer, factor_device, lora_dtype
from .tokens import tokens_first

# The fused base+LoRA autograd function is used where it is exact (see LoraLinear.forward);
# tests switch it off to compare against the plain autograd path.
FUSED = True
# The base types whose forward returns a fresh output tensor that nothing else holds (see
# LoraLinear._owns_output): exact types, as a subclass may override the forward.
_FRESH_OUTPUT = (nn.Linear, Linear4bit)


def _custom_base(module: nn.Module) -> bool:
    """True when the base is not a plain matmul layer (4-bit, or a subclass with its own forward)."""
    return is_4bit(module) or not (type(module) is nn.Linear or is_conv1d(module))


class _FusedLoraLinear(torch.autograd.Function):
    """y = x·W0ᵀ + b0 + s·(x·Aᵀ)·Bᵀ in one function with a hand-written backward.

    Shapes: x (N × in), W0 (out × in) — or (in × out) for GPT-2 Conv1D —, A (r × in), B (out × r).
    Backward, with G = ∂L/∂y (N × out) and G_B = G·B (N × r):
        ∂L/∂x = G·W0 + s·G_B·A      ∂L/∂A = s·G_Bᵀ·x      ∂L/∂B = s·Gᵀ·(x·Aᵀ)
    Only x and the rank-r product x·Aᵀ are kept for backward; no gradient is formed for W0.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, in_out: bool):
        x2 = x.reshape(-1, x.shape[-1])
        w_t = weight if in_out else weight.t()  # (in × out) either way, as a view
        y = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t
        xa = x2 @ a.t()  # (N × r)
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, xa)
        ctx.scaling, ctx.in_out, ctx.x_shape = scaling, in_out, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, a, b, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        g_b = g @ b  # (N × r)
        dx = dbias = da = db = None
        if ctx.needs_input_grad[0]:
            dx = g @ (weight.t() if ctx.in_out else weight)
            dx.addmm_(g_b, a, alpha=s)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            dbias = g.sum(0)
        if ctx.needs_input_grad[3]:
            da = (g_b.t() @ x2).mul_(s)
        if ctx.needs_input_grad[4]:
            db = (g.t() @ xa).mul_(s)
        return dx, None, dbias, da, db, None, None


class LoraLinear(LoraLayer):
    """LoRA on a linear map: ``nn.Linear``, GPT-2 ``Conv1D`` or a 4-bit linear.

    x (..., in) → base(x) + s · (dropout(x) @ Aᵀ) @ Bᵀ, A (r × in), B (out × r).
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = self.features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        """(in, out) of the base map; GPT-2 Conv1D stores its weight as (in × out)."""
        if is_conv1d(base):
            fin, fout = base.weight.shape
            return fin, fout
        return base.in_features, base.out_features

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """A (r × in), B (out × r)."""
        fin, fout = cls.features(base)
        return {"lora_A.weight": (r, fin), "lora_B.weight": (fout, r)}

    @property
    def stores_transposed(self) -> bool:
        return self.fan_in_fan_out

    def _create(self, name: str, r: int) -> None:
        w = self.base_layer.weight
        kw = {"device": factor_device(w), "dtype": lora_dtype(w)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=self.lora_bias.get(name, False), **kw)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def compute_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the branch uses them on an input of ``dtype``: cast to it where ``compute``
        is ``"input"`` and the input is half precision over fp32 factors (see ``LoraLayer``)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        branch = self.branch_dtype(dtype, a.dtype)
        return (a, b) if branch == a.dtype else (a.to(branch), b.to(branch))

    def _add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.compute_factors(name, x.dtype)
        xa = F.linear(self.lora_dropout[name](x.to(a.dtype)), a)
        result = self.add_low_rank(result, xa, b, self.scaling[name], inplace=self._owns_output())
        bias = self.lora_bias_param(name)
        return result if bias is None else result + (bias * self.scaling[name]).to(result.dtype)

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B(A(dropout(x))), B's bias included (``lora_bias``)."""
        a, b = self.compute_factors(name, x.dtype)
        bias = self.lora_bias_param(name)
        xa = F.linear(self.lora_dropout[name](x.to(a.dtype)), a)
        return F.linear(xa, b, None if bias is None else bias.to(b.dtype)) * self.scaling[name]

    def _owns_output(self) -> bool:
        """Whether the base's output is a fresh tensor that nothing else holds or saves for
        backward (ours to add into in place): ``nn.Linear`` and loraforge's 4-bit linear, with
        no forward hook that could keep a reference to it."""
        base = self.base_layer
        if base._forward_hooks or nn.modules.module._global_forward_hooks:
            return False
        return type(base) in _FRESH_OUTPUT

    @staticmethod
    def add_low_rank(
        result: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scaling: float, inplace: bool = False
    ) -> torch.Tensor:
        """``result + s·xa·Bᵀ`` with xa = x·Aᵀ (..., r) and B (out × r): the path of the layers the
        fused function does not take (4-bit bases, several adapters, dropout, fp32 factors on a
        half-precision model). Where B is in the result's dtype, the scale goes on the (tokens × r)
        side and the sum into the product: eagerly ``result.addmm_`` where ``inplace`` allows it
        (a 2-D result that is no view: nothing read or written but the output itself), else one
        ``addmm``, which first copies ``result`` into its new output. (Compiled, TorchInductor
        makes that copy of an in-place ``addmm_`` too; a product and a sum for it to fuse into
        the next pointwise kernel was slower on a GPU, BENCHMARKS.md.)"""
        if b.dtype == result.dtype and result.dim() >= 2:
            h = (xa * scaling).reshape(-1, xa.shape[-1])
            if inplace and result.dim() == 2 and not torch.compiler.is_compiling() and not result._is_view():
                return result.addmm_(h, b.t())
            return torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t()).view(result.shape)
        return result + (F.linear(xa, b) * scaling).to(result.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable(x)
        if name is None:
            return self._forward_unfused(x, *args, **kwargs)
        self.check_merged_training()
        base = self.base_layer
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        out = _FusedLoraLinear.apply(x, base.weight, base.bias, a, b, self.scaling[name], self.fan_in_fan_out)
        return dora.finish(self, out, name)  # (a DoRA adapter: LoRA's output rescaled per channel)

    def _forward_unfused(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``LoraLayer.forward``, on tokens flattened to 2-D where the base's output is ours to add
        into in place (see ``add_low_rank``): a 3-D output's 2-D view would make autograd copy the
        whole gradient in backward for the in-place sum."""
        if (
            self.disabled or self.batch_adapters is not None or self._per_token() or args or kwargs
            or x.dim() < 3
            or torch.compiler.is_compiling() or not self._owns_output()
        ):  # fmt: skip
            return super().forward(x, *args, **kwargs)
        self.check_merged_training()
        x2 = x.reshape(-1, x.shape[-1])
        result = self.base_layer(x2)
        for name in self.live_adapters():
            result = self._add_adapter(result, x2, name)
        return result.view(*x.shape[:-1], result.shape[-1])

    def _fusable(self, x: torch.Tensor) -> str | None:
        """The one adapter to fuse with the base matmul, or None where fusing would not be exact."""
        if (
            not FUSED or self.disabled or self.batch_adapters is not None or self._per_token()
            or _custom_base(self.base_layer)
        ):  # fmt: skip
            return None
        live = self.live_adapters()
        if len(live) != 1 or not isinstance(self.lora_dropout[live[0]], nn.Identity):
            return None
        if self.lora_bias_param(live[0]) is not None:  # (the fused function has no bias for B)
            return None
        w = self.base_layer.weight
        if w.requires_grad or w.dtype != x.dtype or self.lora_A[live[0]].weight.dtype != x.dtype:
            return None
        return live[0]

    def _stacks(self, uniq: list[str], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's factors zero-padded to the largest rank and stacked, BASE first as zeros:
        A (n, r_max, in) and s·B (n, r_max, out) (B transposed, so the second batched matmul
        reads it as stored). Building them takes ~2n small copies per layer, ~40 µs of Python
        for 8 adapters, which made a GPU-bound forward CPU-bound; so where no gradient is needed
        (serving: batch after batch, decoding step after step) they are kept, one set per layer,
        until a factor changes (the key holds each factor's storage and version counter, which
        every in-place update, an optimizer step or ``load_state_dict``, advances), the batch's
        adapters or dtype change, or the adapter is deleted. They cost one copy of the batch's
        adapters in the branch dtype, as a multi-adapter server's stacked adapter buffer does."""
        params = [p for n in uniq[1:] for p in self.factors(n)]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        try:
            versions = tuple((p.data_ptr(), p._version) for p in params)
        except RuntimeError:  # inference tensors keep no version counter: no cache
            versions, grad = (), True
        key = (tuple(uniq), dtype, str(device), versions, tuple(self.scaling[n] for n in uniq[1:]))
        cached = self.__dict__.get("_stack_cache")
        if not grad and cached is not None and cached[0] == key:
            return cached[1]
        self.__dict__.pop("_stack_cache", None)  # (free the old set before building the new one)
        r_max = max(self.r[n] for n in uniq[1:])
        a_stack = torch.zeros((len(uniq), r_max, self.in_features), dtype=dtype, device=device)
        b_stack = torch.zeros((len(uniq), r_max, self.out_features), dtype=dtype, device=device)
        for i, n in enumerate(uniq[1:], start=1):
            a, b = self.factors(n)
            a_stack[i, : self.r[n]] = a
            b_stack[i, : self.r[n]] = b.T * self.scaling[n]
        # none kept while a gradient flows through the copies (training a mixed batch)
        self.__dict__["_stack_cache"] = None if grad else (key, (a_stack, b_stack))
        return a_stack, b_stack

    def _concat(self, names: list[str], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of ``names`` concatenated along the rank: A_cat (R × in) and s·B_cat
        (out × R), R = Σ r, kept from step to step until the names, the dtype or a factor
        (its version counter: any in-place update) or a scaling changes, or an adapter is added
        to or deleted from the layer (``LoraLayer.add`` / ``delete``)."""
        cached = self.__dict__.get("_concat_cache")
        if cached is not None:
            (c_names, c_dtype, c_device, params, versions, scalings), tensors = cached
            if (
                c_names == names and c_dtype == dtype and c_device == device
                and all(p._version == v for p, v in zip(params, versions))
                and scalings == [self.scaling[n] for n in names]
            ):  # fmt: skip
                return tensors
        self.__dict__.pop("_concat_cache", None)
        params = [p for n in names for p in self.factors(n)]
        with torch.no_grad():
            a_cat = torch.cat([self.factors(n)[0] for n in names]).to(device, dtype)
            b_cat = torch.cat([self.factors(n)[1] * self.scaling[n] for n in names], dim=1).to(device, dtype)
        try:
            versions = [p._version for p in params]
        except RuntimeError:  # inference tensors keep no version counter: nothing kept
            return a_cat, b_cat
        key = (list(names), dtype, device, params, versions, [self.scaling[n] for n in names])
        self.__dict__["_concat_cache"] = (key, (a_cat, b_cat))
        return a_cat, b_cat

    def _forward_tokens(self, x: torch.Tensor, plan, *args, **kwargs) -> torch.Tensor:
        """The base on all T tokens of a serving step, plus each token's adapter (see
        ``tokens.py``): decoding tokens through the concatenated factors, prompt runs through
        their adapter's own; the sums go into the base's output in place."""
        if any(self.lora_bias_param(n) is not None for n in self.r):  # the general path adds B's bias
            return super()._forward_tokens(x, plan, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        g = plan.groups(self.r, x.device)
        if g is None:
            return result
        if not self._owns_output() or result._is_view():
            result = result.clone()
        dtype = self.branch_dtype(x.dtype, self.lora_A[g.stack_names[0]].weight.dtype)
        xt = tokens_first(x, plan.num_tokens).to(dtype)
        out = tokens_first(result, plan.num_tokens)
        if g.decode_mask is not None:
            a_cat, b_cat = self._concat(g.stack_names, dtype, x.device)
            nd = g.n_decode
            h = F.linear(xt[:nd], a_cat).mul_(g.decode_mask.to(dtype))  # (n_decode, R)
            out[:nd].add_(F.linear(h, b_cat).to(out.dtype))
        for name, start, end in g.runs:
            a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
            xs = xt[start:end]
            if end - start < plan.min_rows:  # (a zero-padded copy: see tokens.py, batch invariance)
                xs = torch.cat([xs, xs.new_zeros((plan.min_rows - (end - start), xs.shape[1]))])
            delta = F.linear(F.linear(xs, a), b)[: end - start]
            out[start:end].add_(delta.to(out.dtype), alpha=self.scaling[name])
        return result

    def _add_row_biases(self, result: torch.Tensor, uniq: list[str], idx: torch.Tensor) -> torch.Tensor:
        """``result`` (batch, …, out) plus each row's adapter's s·bias of B (``lora_bias``)."""
        biases = [(i, self.lora_bias_param(n), self.scaling[n]) for i, n in enumerate(uniq) if n in self.r]
        biases = [(i, b, s) for i, b, s in biases if b is not None]
        if not biases:
            return result
        table = result.new_zeros((len(uniq), result.shape[-1]))
        for i, b, s in biases:
            table[i] = (b * s).to(table.dtype)
        return result + table[idx].view(idx.shape[0], *(1,) * (result.dim() - 2), -1)

    def _forward_mixed(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        # The base matmul runs once for the whole batch; the low-rank path is a gather of each
        # row's (A, B) followed by two batched matmuls, the second adding into the base output
        # (baddbmm: no separate sum over the (batch, tokens, out) tensor). Ranks differ, so
        # factors are zero-padded to the largest r (zero rows add nothing); BASE rows get zeros.
        result = self.base_layer(x, *args, **kwargs)
        uniq, idx = self._row_index(names, x.shape[0], x.device)
        if len(uniq) == 1:
            return result
        dtype = self.branch_dtype(x.dtype, self.lora_A[uniq[1]].weight.dtype)
        result = self._add_row_biases(result, uniq, idx)
        a_stack, b_stack = self._stacks(uniq, dtype, x.device)
        xb = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)  # (batch, tokens, in)
        low = torch.bmm(xb, a_stack[idx].transpose(1, 2))  # (batch, tokens, r_max)
        if result.dtype == dtype:
            if (
                result.dim() == 3
                and self._owns_output()
                and not result._is_view()
                and not torch.compiler.is_compiling()
            ):  # fmt: skip  (in place, as add_low_rank)
                return result.baddbmm_(low, b_stack[idx])
            r3 = result.reshape(low.shape[0], low.shape[1], -1)
            return torch.baddbmm(r3, low, b_stack[idx]).reshape(result.shape)
        delta = torch.bmm(low, b_stack[idx])  # (batch, tokens, out)
        return result + delta.reshape(result.shape).to(result.dtype)
