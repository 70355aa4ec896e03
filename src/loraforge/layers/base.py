"""What every LoRA wrapper shares: the adapter bookkeeping, merge/unmerge and the forward.

See ``loraforge.layers`` for the maths; the wrappers for each kind of base layer are in the
sibling files (``linear``, ``embedding``, ``conv``).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..kinds import is_4bit, is_conv1d
from . import dora
from .adapter import AdapterLayer
from .merge import (
    add_exactly,
    exact_matmul,
    restore_quantized,
    snapshot_factors,
    snapshot_quantized,
    subtract_exactly,
)
from .tokens import tokens_first

BASE = "__base__"  # the name that means "no adapter" in a mixed batch

# The low-rank path runs in this precision when the base is stored in half precision or 4 bits:
# rank-r matmuls are cheap, and fp32 keeps small updates from rounding away.
_UPCAST = (torch.float16, torch.bfloat16)


def lora_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the LoRA factors on a base weight of this dtype: fp32 over a half-precision
    or packed (integer) weight, else the weight's own."""
    return torch.float32 if (weight.dtype in _UPCAST or not weight.is_floating_point()) else weight.dtype


# Where adapters added to a layer whose base weight is still on the meta device get their factors
# (a skeleton whose weights are loaded afterwards: training/sharded_load.py); None: on meta too.
_META_FACTORS_DEVICE: torch.device | None = None


@contextlib.contextmanager
def factors_on(device: torch.device):
    """Within the block, adapters added over a base weight on the meta device get real factors on
    ``device``, initialised there as over a loaded base: the same random draws in the same order
    (the default inits never read the base weight)."""
    global _META_FACTORS_DEVICE
    previous, _META_FACTORS_DEVICE = _META_FACTORS_DEVICE, torch.device(device)
    try:
        yield
    finally:
        _META_FACTORS_DEVICE = previous


def factor_device(weight: torch.Tensor) -> torch.device:
    """The device of new LoRA factors over a base weight: the weight's (see ``factors_on``)."""
    if weight.device.type == "meta" and _META_FACTORS_DEVICE is not None:
        return _META_FACTORS_DEVICE
    return weight.device


COMPUTE_MODES = ("input", "adapter")


class LoraLayer(AdapterLayer):
    """State shared by every wrapper: ranks, scalings, active / merged adapters, mixed batches.

    ``compute``: the dtype of the low-rank branch where a half-precision input (bf16 / fp16)
    meets the fp32 factors that such a base gets (``lora_dtype``). ``"input"`` (default): the
    factors are cast to the input's dtype, as ``torch.autocast`` would, and stay fp32 master
    weights whose gradients autograd accumulates in fp32. ``"adapter"``: the input is cast to
    fp32 and the branch runs in fp32 (PEFT's default). Both keep the gradient error of a bf16
    step, but ``"adapter"`` casts the (tokens x in) activations to fp32 and back, which costs
    step time and peak memory (BENCHMARKS.md, CUDA section). Set with
    ``loraforge.set_compute(model, mode)``.
    """

    adapter_param_names: tuple[str, ...] = ()
    compute: str = "input"
    stores_transposed = False  # the base stores W0 as (in × out): GPT-2 Conv1D, embedding tables
    loftq_settings = (4, 1)  # (bits, iterations) for init="loftq" (see loraforge.loftq); inject sets them

    def branch_dtype(self, input_dtype: torch.dtype, factor_dtype: torch.dtype) -> torch.dtype:
        """The dtype the low-rank branch runs in for this input and these factors."""
        if self.compute == "input" and input_dtype in _UPCAST and factor_dtype == torch.float32:
            return input_dtype
        return factor_dtype

    method = "LoRA"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.merge_error: dict[str, float] = {}  # rounding error of a requantized merge (4-bit)
        self.lora_bias: dict[str, bool] = {}  # adapter -> whether B has a bias (lora_bias)

    # -- adapter bookkeeping ----------------------------------------------------------------
    def add(
        self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, init: str | bool,
        lora_bias: bool = False,
    ) -> None:  # fmt: skip
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.r[name], self.alpha[name] = r, alpha
        self.lora_bias[name] = lora_bias
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create(name, r)
        self.__dict__.pop("_concat_cache", None)
        # New modules follow this layer's mode (nn.Module starts in training mode): an adapter
        # added to / loaded into a model in eval mode must not run its dropout.
        new = [self.lora_dropout[name]] + [
            getattr(self, attr)[name] for attr in self.adapter_param_names if name in getattr(self, attr)
        ]
        for module in new:
            if isinstance(module, nn.Module):
                module.train(self.training)
        self.reset(name, init)
        if init == "loftq":  # (after reset: LoftQ sets A, B and replaces the base weight by Q)
            from ..loftq import init_loftq

            init_loftq(self, name, *self.loftq_settings)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete(self, name: str) -> None:
        super().delete(name)
        del self.lora_dropout[name]
        for d in (self.r, self.alpha, self.scaling, self.lora_bias):
            d.pop(name, None)
        self.__dict__.pop("_stack_cache", None)  # (mixed batches' stacked factors: see _stacks)
        self.__dict__.pop("_concat_cache", None)  # (serving's concatenated factors: see _concat)

    @property
    def adapters(self) -> list[str]:
        return list(self.r)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one adapter, as 2-D matrices (r × in_flat), (out × r)."""
        raise NotImplementedError

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """The shapes of a rank-``r`` adapter's factors on ``base`` (before any is created), by
        their path in the layer without the adapter name, as PEFT files name them
        (``{"lora_A.weight": (r, in), "lora_B.weight": (out, r)}`` for a linear map)."""
        raise NotImplementedError

    @classmethod
    def check(cls, base: nn.Module, cfg, r: int) -> None:
        """Raise ValueError (one line, the reason) where ``cfg`` cannot adapt ``base`` at rank
        ``r``: called for every target before the model changes."""

    def lora_bias_param(self, name: str) -> torch.Tensor | None:
        """B's bias (out) where the adapter has ``lora_bias``, else None."""
        b = self._modules.get("lora_B")
        return getattr(b[name], "bias", None) if b is not None and name in b else None

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        fa, fb = self.factors(name)
        with torch.no_grad():
            fa.copy_(a.reshape(fa.shape))
            fb.copy_(b.reshape(fb.shape))

    def reset(self, name: str, init: str | bool) -> None:
        if init is False:
            # PEFT's init_lora_weights=False: A and B (and B's bias) keep the default init their
            # nn.Linear / nn.ConvNd got when ``_create`` made them (Kaiming-uniform a=√5, bias
            # U(±1/√fan_in)), drawn in PEFT's order: under one seed, PEFT's very values.
            return
        a, b = self.factors(name)
        bias = self.lora_bias_param(name)
        with torch.no_grad():
            if bias is not None:
                nn.init.zeros_(bias)
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r[name])
            else:
                # Kaiming-uniform with a=√5 is nn.Linear's default; B = 0 makes ΔW = 0 at the start.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        if init in ("pissa", "olora"):
            self.__dict__.setdefault("pending_init", {})[name] = init
            if self.base_layer.weight.device.type != "meta":  # (else once the base is loaded:
                self.init_from_base()  # training/sharded_load.py)

    def init_from_base(self) -> None:
        """Compute the factors of the inits that read the base weight (PiSSA, OLoRA), which
        ``reset`` leaves pending while that weight is still on the meta device."""
        for name, init in self.__dict__.pop("pending_init", {}).items():
            self._init_pissa(name) if init == "pissa" else self._init_olora(name)

    def _init_olora(self, name: str) -> None:
        # OLoRA (PEFT's olora_init): W = Q·R (fp32); B = Q[:, :r], A = R[:r] unscaled, and W keeps
        # W - s·B·A, so that the adapted layer starts equal to the base.
        if is_4bit(self.base_layer):
            raise ValueError("init='olora' needs a full-precision base layer, not a quantized one")
        q, rr = torch.linalg.qr(self._ba_layout(self.base_weight().float()))
        r = self.r[name]
        self.set_factors(name, rr[:r], q[:, :r])
        self._add_to_base(-self.delta_weight(name))

    def _init_pissa(self, name: str) -> None:
        # PiSSA: W = U S Vᵀ; B·A takes the top-r part, scaled so s·B·A equals it; W keeps the rest.
        if is_4bit(self.base_layer):
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
        if is_4bit(base):
            return base.dequantize()
        if is_conv1d(base):
            return base.weight.T
        return base.weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B·A in the base weight's (out × in) layout."""
        a, b = self.factors(name)
        return self._delta(a, b, self.scaling[name])

    def _delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """ΔW (fp32) for these factors: ``delta_weight`` of given rather than live factors."""
        return ((b.float() * scaling) @ a.float()).reshape(self.base_weight_shape())

    def base_weight_shape(self) -> tuple[int, ...]:
        base = self.base_layer
        if is_4bit(base):
            return (base.out_features, base.in_features)
        if is_conv1d(base):
            return tuple(base.weight.T.shape)
        return tuple(base.weight.shape)

    def _add_to_base(self, delta: torch.Tensor) -> float | None:
        """W0 += delta; on a 4-bit base the sum is requantized and its mean |error| returned.
        A permanent change (PiSSA's residual, a 4-bit merge whose original ``merge`` keeps):
        merges of full-precision weights go through ``add_exactly`` instead."""
        base = self.base_layer
        with torch.no_grad():
            if is_4bit(base):
                return float(base.requantize_(base.dequantize(torch.float32) + delta.float()))
            w = base.weight
            if is_conv1d(base):
                delta = delta.T
            # add in fp32 and round once
            w.copy_((w.float() + delta.to(w.device, torch.float32)).to(w.dtype))
        return None

    # -- merge -------------------------------------------------------------------------------
    # The base holds W0 + Σ ΔW of ``merged_adapters``, always formed from W0 in one rounding;
    # ``_merge_record`` (see ``merge.py``) holds what gives W0 back bit for bit. Merging or
    # unmerging one adapter of several restores W0 and merges the others again.
    # (merge / unmerge: AdapterLayer's, over _merge_from_base and _restore_base below. The base
    # gets ΔW of each adapter, and s·bias of B for lora_bias.)
    def to_merge(self, name: str | list[str]) -> list[str]:
        """The adapters among ``name`` that a merge would add (not merged yet); raises
        ValueError where they cannot merge into this layer (nothing changes)."""
        new = super().to_merge(name)
        biased = [n for n in new if self.lora_bias_param(n) is not None]
        if biased and getattr(self.base_layer, "bias", None) is None:
            raise ValueError(
                f"a lora_bias adapter cannot merge into a {type(self.base_layer).__name__} without a bias "
                f"(adapters {biased}); run it unmerged"
            )
        return new

    def nonfinite_merge(self, name: str | list[str]) -> str | None:
        """Which of the base weight / bias would hold NaN or Inf once the adapter(s) are merged
        (None: neither): the merge computed on a copy, the layer unchanged (``lf.merge(safe=True)``)."""
        new = self.to_merge(name)
        if not new:
            return None
        factors = snapshot_factors(self, new)
        scales = dora.merge_scales(self, factors)
        base = self.base_layer
        with torch.no_grad():
            if is_4bit(base):
                trial = dora.apply_merge(self, base.dequantize(torch.float32), factors, scales, 1.0)
            else:
                trial = base.weight.detach().clone()
                self._applier(factors, scales)(trial, 1.0)
            if not bool(torch.isfinite(trial).all()):
                return "weight"
            del trial
            delta_b = self._bias_delta(new)
            if delta_b is not None:
                b = base.bias
                if not bool(torch.isfinite((b.float() + delta_b.to(b.device)).to(b.dtype)).all()):
                    return "bias"
        return None

    def _bias_delta(self, names: list[str]) -> torch.Tensor | None:
        """Σ s·bias of B over the ``lora_bias`` adapters among ``names`` (fp32), or None."""
        terms = [(self.lora_bias_param(n), self.scaling[n]) for n in names]
        terms = [(b.detach().float(), s) for b, s in terms if b is not None]
        if not terms:
            return None
        delta = terms[0][0] * terms[0][1]
        for b, s in terms[1:]:
            delta = delta + b * s
        return delta

    def _merge_from_base(self, names: list[str]) -> None:
        """W ← W0 + Σ ΔW of ``names``, with W0 the unmerged base; keeps the record to undo it."""
        factors = snapshot_factors(self, names)
        scales = dora.merge_scales(self, factors)  # (DoRA adapters' m and f, from the unmerged base)
        base = self.base_layer
        if is_4bit(base):
            record = snapshot_quantized(base, factors)
            if scales:
                w = dora.apply_merge(self, base.dequantize(torch.float32), factors, scales, 1.0)
                error = float(base.requantize_(w))
            else:
                error = self._add_to_base(self._stored_delta(factors))
            for n in names:
                self.merge_error[n] = error
        else:
            device = next(iter(factors.values()))[0].device
            record = add_exactly(base.weight, self._applier(factors, scales), factors, device)
        record.scales = scales
        dora.forget(self)
        self._merge_record = record
        delta_b = self._bias_delta(names)
        if delta_b is not None:  # (lora_bias: the base bias gets Σ s·bias, undone exactly as the weight)
            bias = base.bias
            biases = {n: b.detach().clone() for n in names if (b := self.lora_bias_param(n)) is not None}

            def apply_b(t: torch.Tensor, sign: float) -> None:
                t.copy_((t.float() + sign * delta_b.to(t.device)).to(t.dtype))

            record_b = add_exactly(bias, apply_b, factors, bias.device)
            self.__dict__["_bias_record"] = (record_b, apply_b, biases)
        self.merged_adapters = list(names)

    def _applier(self, factors: dict, scales: dict | None = None):
        """``apply(t, sign)``: t ← t ± Σ ΔW of the recorded (A, B, s) factors, in place, in t's
        dtype, by the same operations every time (adapters in merge order, reversed to
        subtract). Where t is a matrix in the factors' dtype: one ``addmm_`` per adapter, the
        (out × in) product never formed; otherwise ΔW in fp32 (computed once per applier),
        added in fp32 and rounded once. DoRA adapters (``scales``: ``dora.merge_scales``) also
        scale the output channels: t ← f ⊙ (t + ΔW), and back t ← t / f − ΔW."""
        items = list(factors.items())
        scales = scales or {}
        cache: list[torch.Tensor] = []

        def apply(t: torch.Tensor, sign: float) -> None:
            with exact_matmul():
                plain = all(a.dtype == t.dtype and a.device == t.device for _, (a, _, _) in items)
                if t.dim() == 2 and plain:
                    for n, (a, b, s) in reversed(items) if sign < 0 else items:
                        if n in scales and sign < 0:
                            t.div_(dora.stored_view(self, scales[n][1], t))
                        # (out × in) = B·A; stored transposed (in × out) = Aᵀ·Bᵀ (Conv1D, embeddings)
                        if self.stores_transposed:
                            t.addmm_(a.t(), b.t(), alpha=sign * s)
                        else:
                            t.addmm_(b, a, alpha=sign * s)
                        if n in scales and sign > 0:
                            t.mul_(dora.stored_view(self, scales[n][1], t))
                    return
                if scales:  # in fp32, adapter by adapter, rounded once
                    t.copy_(dora.apply_merge(self, t.float(), factors, scales, sign))
                    return
                if not cache:
                    cache.append(self._stored_delta(factors).to(t.device))
            t.copy_(torch.add(t, cache[0], alpha=sign))

        return apply

    def _stored_delta(self, factors: dict) -> torch.Tensor:
        """Σ ΔW of (A, B, s) triples, fp32, in the layout the base stores its weight in; on the
        factors' device, in full precision (the same bits at merge and unmerge: see merge.py)."""
        with exact_matmul():
            deltas = [self._delta(*f) for f in factors.values()]
        delta = deltas[0]
        for d in deltas[1:]:
            delta.add_(d)
        return delta.T if is_conv1d(self.base_layer) else delta

    def _restore_base(self) -> list[str]:
        """Put W0 back exactly; returns the merged adapters whose live factors differ from the
        merged ones."""
        record = self.__dict__.pop("_merge_record", None)
        if record is None:  # (no record: merged by other means; subtract, exact up to rounding)
            if any(dora.is_dora(self, n) for n in self.merged_adapters):
                raise RuntimeError("a DoRA adapter merged without its merge record cannot be unmerged")
            for n in reversed(self.merged_adapters):
                self._add_to_base(-self.delta_weight(n))
            self.merged_adapters = []
            return []
        base = self.base_layer
        dora.forget(self)
        if is_4bit(base):
            restore_quantized(base, record)
        else:
            device = next(iter(record.factors.values()))[0].device
            applier = self._applier(record.factors, record.scales)
            subtract_exactly(base.weight, applier, record, device, type(base).__name__)
        changed = [
            n
            for n, f in record.factors.items()
            if n in self.r and (not self._same_factors(n, *f) or dora.changed(self, n, record.scales))
        ]
        bias_record = self.__dict__.pop("_bias_record", None)
        if bias_record is not None:
            rec, apply_b, biases = bias_record
            subtract_exactly(base.bias, apply_b, rec, base.bias.device, type(base).__name__)
            changed += [
                n for n, b in biases.items()
                if n in self.r and n not in changed and not torch.equal(b, self.lora_bias_param(n))
            ]  # fmt: skip
        self.merged_adapters = []
        return changed

    def _same_factors(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> bool:
        same = all(torch.equal(x.to(y.device), y) for x, y in zip((a, b), self.factors(name)))
        return same and scaling == self.scaling[name]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None or self._per_token():
            if self.merged_adapters:
                raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call lf.unmerge(model)")
            if self.batch_adapters is None:
                result = self._forward_tokens(x, self.token_plan, *args, **kwargs)
                return dora.rescale_tokens(self, result, self.token_plan)
            result = self._forward_mixed(x, self.batch_adapters, *args, **kwargs)
            return dora.rescale_rows(self, result, self.batch_adapters)
        self.check_merged_training()
        result = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            result = self._add_adapter(result, x, name)
        return result

    def live_adapters(self) -> list[str]:
        """The active adapters that this layer holds and that are not merged: those the forward
        adds."""
        return [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]

    def _add_adapter(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` with one adapter applied: LoRA's sum, or DoRA's rescaled one (``dora.py``)."""
        if dora.is_dora(self, name):
            return dora.add(self, result, x, name)
        return self._add_lora(result, x, name)

    def _add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result + s·lora(x)`` for one adapter."""
        return result + self._lora(x, name).to(result.dtype)

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _forward_mixed(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def _per_token(self) -> bool:
        return self.token_plan is not None and self.token_plan.active

    def _forward_tokens(self, x: torch.Tensor, plan, *args, **kwargs) -> torch.Tensor:
        """The base on every token, plus each token's own adapter (see ``tokens.py``): the
        general path, one product per adapter present; ``LoraLinear`` batches them."""
        result = self.base_layer(x, *args, **kwargs)
        groups = plan.groups(self.r, x.device)
        if groups is None:
            return result
        result = result.clone()  # (the base may hold on to its output)
        xt, out = tokens_first(x, plan.num_tokens), tokens_first(result, plan.num_tokens)
        for name, rows in groups.rows.items():
            out.index_add_(0, rows, self._lora(xt.index_select(0, rows), name).to(out.dtype))
        return result

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
