"""LoRA wrappers around frozen base layers.

Every wrapper keeps the original module as ``base_layer`` and holds, per adapter name, the
low-rank factors ``A`` (r × in) and ``B`` (out × r). The adapted layer computes

    h = base_layer(x) + Σ_active  s · B·(A·dropout(x)),     s = alpha / r   (or alpha / √r)

right to left, so the (out × in) product B·A is only ever formed to merge it into the base.
Parameter names follow PEFT (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``) so that
files map one to one onto PEFT's.

The base may be ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored in × out), a 4-bit
linear (anything with ``in_features``/``out_features``/``dequantize()``), ``nn.Embedding`` or
``nn.Conv2d``. LoRA does not know how the base stores its weight: ``base_weight()`` and
``_add_to_base()`` are the only places that look.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BASE = "__base__"  # the name that means "no adapter" in a mixed batch

# The low-rank path runs in this precision when the base is stored in half precision or 4 bits:
# rank-r matmuls are cheap, and fp32 keeps small updates from rounding away.
_UPCAST = (torch.float16, torch.bfloat16)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _custom_base(module: nn.Module) -> bool:
    """True when the base is not a plain matmul layer (4-bit, or a subclass with its own forward)."""
    return _is_quantized(module) or not (type(module) is nn.Linear or _is_conv1d(module))


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "dequantize") and hasattr(module, "quant_state")


def _lora_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if (weight.dtype in _UPCAST or not weight.is_floating_point()) else weight.dtype


COMPUTE_MODES = ("input", "adapter")


class LoraLayer(nn.Module):
    """State shared by every wrapper: ranks, scalings, active / merged adapters, mixed batches.

    ``compute``: the dtype of the low-rank branch where a half-precision input (bf16 / fp16)
    meets the fp32 factors that such a base gets (``_lora_dtype``). ``"input"`` (default): the
    factors are cast to the input's dtype, as ``torch.autocast`` would, and stay fp32 master
    weights whose gradients autograd accumulates in fp32. ``"adapter"``: the input is cast to
    fp32 and the branch runs in fp32 (PEFT's default). Both keep the gradient error of a bf16
    step (4.1e-2 and 4.0e-2 against an fp32 step for a 1B Llama), but casting the (tokens x in)
    activations to fp32 and back took the step from 2.23x to 1.69x PEFT's throughput and its peak
    memory from 8.5 to 11.0 GB there (H100, BENCHMARKS.md). Set with
    ``loraforge.set_compute(model, mode)``.
    """

    adapter_param_names: tuple[str, ...] = ()
    compute: str = "input"

    def branch_dtype(self, input_dtype: torch.dtype, factor_dtype: torch.dtype) -> torch.dtype:
        """The dtype the low-rank branch runs in for this input and these factors."""
        if self.compute == "input" and input_dtype in _UPCAST and factor_dtype == torch.float32:
            return input_dtype
        return factor_dtype

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapters: list[str] | None = None  # one adapter name per batch row, or None
        self.merge_error: dict[str, float] = {}  # rounding error of a requantized merge (4-bit)

    # -- adapter bookkeeping ----------------------------------------------------------------
    def add(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: str) -> None:
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.r[name], self.alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create(name, r)
        self.reset(name, init)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge(name)
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        del self.lora_dropout[name]
        for d in (self.r, self.alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self.__dict__.pop("_stack_cache", None)  # (mixed batches' stacked factors: see _stacks)

    @property
    def adapters(self) -> list[str]:
        return list(self.r)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one adapter, as 2-D matrices (r × in_flat), (out × r)."""
        raise NotImplementedError

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        fa, fb = self.factors(name)
        with torch.no_grad():
            fa.copy_(a.reshape(fa.shape))
            fb.copy_(b.reshape(fb.shape))

    def reset(self, name: str, init: str) -> None:
        a, b = self.factors(name)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r[name])
            else:
                # Kaiming-uniform with a=√5 is nn.Linear's default; B = 0 makes ΔW = 0 at the start.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        if init == "pissa":
            self._init_pissa(name)

    def _init_pissa(self, name: str) -> None:
        # PiSSA: W = U S Vᵀ; B·A takes the top-r part, scaled so s·B·A equals it; W keeps the rest.
        if _is_quantized(self.base_layer):
            raise ValueError("init='pissa' needs a full-precision base layer, not a quantized one")
        w = self._ba_layout(self.base_weight().float())
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        r, s = self.r[name], self.scaling[name]
        root = torch.sqrt(sv[:r] / s)
        self.set_factors(name, root[:, None] * vh[:r], u[:, :r] * root)
        self._add_to_base(-self.delta_weight(name))

    def _ba_layout(self, w: torch.Tensor) -> torch.Tensor:
        """The base weight as the (out × in_flat) matrix that B·A approximates."""
        return w.reshape(w.shape[0], -1)

    # -- weights -----------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as (out × in) (Conv2d: out × in × kh × kw), dequantized if need be."""
        base = self.base_layer
        if _is_quantized(base):
            return base.dequantize()
        if _is_conv1d(base):
            return base.weight.T
        return base.weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B·A in the base weight's (out × in) layout."""
        a, b = self.factors(name)
        return (b.float() @ a.float()).reshape(self.base_weight_shape()) * self.scaling[name]

    def base_weight_shape(self) -> tuple[int, ...]:
        base = self.base_layer
        if _is_quantized(base):
            return (base.out_features, base.in_features)
        if _is_conv1d(base):
            return tuple(base.weight.T.shape)
        return tuple(base.weight.shape)

    def _add_to_base(self, delta: torch.Tensor) -> float | None:
        """W0 += delta; on a 4-bit base the sum is requantized and its mean |error| returned."""
        base = self.base_layer
        with torch.no_grad():
            if _is_quantized(base):
                return float(base.requantize_(base.dequantize(torch.float32) + delta.float()))
            w = base.weight
            if _is_conv1d(base):
                delta = delta.T
            # Add in fp32 and round once: the add/subtract of a switch then drifts by ≤ 1 ulp.
            w.copy_((w.float() + delta.to(w.device, torch.float32)).to(w.dtype))
        return None

    # -- merge -------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        if name not in self.r:
            raise KeyError(name)
        if name in self.merged_adapters:
            return  # idempotent
        error = self._apply_delta(name, +1.0)
        if error is not None:
            self.merge_error[name] = error
        self.merged_adapters.append(name)

    def unmerge(self, name: str | None = None) -> None:
        names = list(reversed(self.merged_adapters)) if name is None else [name]
        for n in names:
            if n not in self.merged_adapters:
                continue
            self._apply_delta(n, -1.0)
            self.merged_adapters.remove(n)

    def _apply_delta(self, name: str, sign: float) -> float | None:
        """W0 ← W0 ± s·B·A. Where the base stores a plain matrix in the factors' dtype this is one
        in-place ``addmm_`` (one pass, no temporaries); the product B·A is computed the same way
        both times, so merge followed by unmerge moves each weight by at most one rounding."""
        a, b = self.factors(name)
        w = None if _is_quantized(self.base_layer) else getattr(self.base_layer, "weight", None)
        if w is not None and w.dim() == 2 and w.dtype == a.dtype and w.device == a.device:
            with torch.no_grad():
                # (out × in) = B·A; stored transposed (in × out) = Aᵀ·Bᵀ for Conv1D and embeddings
                transposed = getattr(self, "fan_in_fan_out", False) or isinstance(self, LoraEmbedding)
                if transposed:
                    w.addmm_(a.t(), b.t(), alpha=sign * self.scaling[name])
                else:
                    w.addmm_(b, a, alpha=sign * self.scaling[name])
            return None
        return self._add_to_base(sign * self.delta_weight(name))

    # -- forward -----------------------------------------------------------------------------
    def _check_merged_training(self) -> None:
        if self.training and torch.is_grad_enabled():
            for n in self.merged_adapters:
                if any(p.requires_grad for p in self._params_of(n)):
                    raise RuntimeError(
                        f"adapter {n!r} is merged into the base weights; call lf.unmerge(model) before "
                        "training it (gradients would not reach the merged copy)"
                    )

    def _params_of(self, name: str) -> list[nn.Parameter]:
        return list(self.factors(name))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            if self.merged_adapters:
                raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call lf.unmerge(model)")
            return self._forward_mixed(x, self.batch_adapters, *args, **kwargs)
        self._check_merged_training()
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.r and name not in self.merged_adapters:
                result = self._add_lora(result, x, name)
        return result

    def _add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result + s·lora(x)`` for one adapter."""
        return result + self._lora(x, name).to(result.dtype)

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _forward_mixed(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def _row_index(self, names: list[str], batch: int, device) -> tuple[list[str], torch.Tensor]:
        """Unique adapter names used by the batch (BASE first) and each row's index into them."""
        if len(names) != batch:
            raise ValueError(f"adapter_batch got {len(names)} names for a batch of {batch} rows")
        key = (tuple(names), str(device), tuple(self.r))
        cached = self.__dict__.get("_row_cache")
        if cached is not None and cached[0] == key:  # e.g. every decoding step of one batch
            return cached[1]
        uniq = [BASE] + sorted({n for n in names if n != BASE and n in self.r})
        pos = {n: i for i, n in enumerate(uniq)}
        # An adapter that does not wrap this layer acts as the base here (as in PEFT).
        idx = torch.tensor([pos.get(n, 0) for n in names], device=device)
        self.__dict__["_row_cache"] = (key, (uniq, idx))  # (a plain attribute: not in state_dict)
        return uniq, idx

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}, merged={self.merged_adapters}"


# The fused base+LoRA autograd function is used where it is exact (see LoraLinear.forward);
# tests switch it off to compare against the plain autograd path.
FUSED = True


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
        if _is_conv1d(base_layer):
            self.in_features, self.out_features = base_layer.weight.shape
            self.fan_in_fan_out = True
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.fan_in_fan_out = False
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, r: int) -> None:
        w = self.base_layer.weight
        kw = {"device": w.device, "dtype": _lora_dtype(w)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)

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
        return self.add_low_rank(result, xa, b, self.scaling[name], inplace=self._owns_output())

    def _owns_output(self) -> bool:
        """Whether the base's output is a fresh tensor that nothing else holds or saves for
        backward (ours to add into in place): ``nn.Linear`` and loraforge's 4-bit linear, with
        no forward hook that could keep a reference to it."""
        base = self.base_layer
        if base._forward_hooks or nn.modules.module._global_forward_hooks:
            return False
        return type(base) is nn.Linear or type(base).__module__ == "loraforge.quant.linear4bit"

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
        the next pointwise kernel measured slower on an H100: 0.072 vs 0.066 s for a 1B step.)"""
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
        self._check_merged_training()
        base = self.base_layer
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return _FusedLoraLinear.apply(
            x, base.weight, base.bias, a, b, self.scaling[name], self.fan_in_fan_out
        )

    def _forward_unfused(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``LoraLayer.forward``, on tokens flattened to 2-D where the base's output is ours to add
        into in place (see ``add_low_rank``): a 3-D output's 2-D view would make autograd copy the
        whole gradient in backward for the in-place sum."""
        if (
            self.disabled or self.batch_adapters is not None or args or kwargs or x.dim() < 3
            or torch.compiler.is_compiling() or not self._owns_output()
        ):  # fmt: skip
            return super().forward(x, *args, **kwargs)
        self._check_merged_training()
        x2 = x.reshape(-1, x.shape[-1])
        result = self.base_layer(x2)
        for name in self.active_adapters:
            if name in self.r and name not in self.merged_adapters:
                result = self._add_lora(result, x2, name)
        return result.view(*x.shape[:-1], result.shape[-1])

    def _fusable(self, x: torch.Tensor) -> str | None:
        """The one adapter to fuse with the base matmul, or None where fusing would not be exact."""
        if not FUSED or self.disabled or self.batch_adapters is not None or _custom_base(self.base_layer):
            return None
        live = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if len(live) != 1 or not isinstance(self.lora_dropout[live[0]], nn.Identity):
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
        a_stack, b_stack = self._stacks(uniq, dtype, x.device)
        xb = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)  # (batch, tokens, in)
        low = torch.bmm(xb, a_stack[idx].transpose(1, 2))  # (batch, tokens, r_max)
        if result.dtype == dtype:
            if (
                result.dim() == 3 and self._owns_output() and not result._is_view()
                and not torch.compiler.is_compiling()
            ):  # fmt: skip  (in place, as add_low_rank)
                return result.baddbmm_(low, b_stack[idx])
            r3 = result.reshape(low.shape[0], low.shape[1], -1)
            return torch.baddbmm(r3, low, b_stack[idx]).reshape(result.shape)
        delta = torch.bmm(low, b_stack[idx])  # (batch, tokens, out)
        return result + delta.reshape(result.shape).to(result.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: row lookup in Aᵀ (num × r), then B (dim × r).

    Parameters are stored as PEFT does: ``lora_embedding_A[name]`` (r × num_embeddings) and
    ``lora_embedding_B[name]`` (embedding_dim × r); ΔW = s · (B·A)ᵀ (num × dim).
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, r: int) -> None:
        w = self.base_layer.weight
        kw = {"device": w.device, "dtype": _lora_dtype(w)}
        num, dim = w.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r, **kw))

    def reset(self, name: str, init: str) -> None:
        a, b = self.factors(name)
        with torch.no_grad():
            # PEFT's embedding init: A = 0, B ~ N(0, 1) — ΔW starts at zero all the same.
            nn.init.zeros_(a)
            nn.init.normal_(b)
        if init == "pissa":
            self._init_pissa(name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return (b.float() @ a.float()).T * self.scaling[name]

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

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        kw = {"device": base.weight.device, "dtype": _lora_dtype(base.weight)}
        self.lora_A[name] = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **kw
        )
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=False, **kw)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        out = b.shape[0]
        return (b.float().reshape(out, -1) @ a.float().reshape(a.shape[0], -1)).reshape(
            self.base_layer.weight.shape
        ) * self.scaling[name]

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

    def add(self, name: str) -> None:
        import copy

        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already exists on this module")
        clone = copy.deepcopy(self.original_module)
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

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
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


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper class for a base module, or a clear error for an unsupported type."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    if isinstance(module, nn.Linear) or _is_conv1d(module) or _is_quantized(module):
        return LoraLinear(module)
    raise TypeError(
        f"LoRA supports nn.Linear, nn.Embedding, nn.Conv2d, GPT-2 Conv1D and 4-bit linears; "
        f"got {type(module).__name__}"
    )


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers "all-linear" targets (Linear, Conv1D, 4-bit linear)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or _is_quantized(module)
