"""LoRA on a bare ``nn.Parameter`` (``LoraConfig.target_parameters``; PEFT's ``ParamWrapper``).

Mixture-of-experts layers keep their expert weights as 3-D parameters used through ``bmm`` /
``einsum`` / indexing rather than as ``nn.Linear`` modules, so there is no layer to wrap. Here
the module that owns the parameter is wrapped instead, and during its forward the parameter is
replaced by the adapted one:

    W_eff = W + Σ_active s · ΔW

* 2-D parameter W (out × in): ΔW = B·A with A (r × in), B (out × r), as for a linear map.
* 3-D parameter W of E experts: every expert e gets its own rank-r update ΔW_e. PEFT stores the
  E updates in two matrices, A (E·r × in) and B (out × r·E), and so does loraforge (the files map
  one to one): A_e = A.reshape(E, r, in)[e] (expert-major rows), B_e = B.reshape(out, r, E)[:, :, e]
  (rank-major columns), ΔW_e = B_e·A_e (out × in). The parameter is read as (E × out × in) —
  the layout of ``F.linear(x, W[e])``, transformers' MoE experts — unless the owning module has
  ``is_transposed = True`` (E × in × out, as in ``x @ W[e]``), as PEFT reads it.

One wrapper adapts one parameter; several parameters of one module are wrapped in nested
wrappers, the first matched innermost (PEFT's layout: ``experts.base_layer.lora_A.weight`` is the
first parameter's A, ``experts.lora_A.weight`` the second's). Every adapter that uses
``target_parameters`` on a model must target the same parameters (PEFT's rule, since the nesting
decides the file keys). Dropout, DoRA, ``lora_bias`` and inits that read the base weight
(PiSSA, OLoRA, LoftQ) do not apply to a parameter and are refused, as PEFT refuses them; a
mixed-adapter batch is refused too.

The forward calls the owning module through ``torch.func.functional_call`` with the adapted
tensor in place of the parameter (nothing is registered on the module, so a failing forward
leaves it as it was); gradients reach A and B through W_eff.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..kinds import replace_module
from .base import LoraLayer, lora_dtype
from .merge import add_exactly, snapshot_factors, subtract_exactly


class LoraParam(LoraLayer):
    """LoRA on the parameter ``parameter_name`` of ``base_layer`` (or of the module that nested
    wrappers around it hold). Factors as PEFT's: ``lora_A[name]`` (E·r × in), ``lora_B[name]``
    (out × r·E), both ``nn.Linear`` without bias."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.num_experts, self.in_features, self.out_features, self.in_out = param_layout(
            self.owner(), parameter_name
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # -- the parameter -----------------------------------------------------------------------
    def owner(self) -> nn.Module:
        """The module that holds the parameter (inside any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParam):
            module = module.base_layer
        return module

    def param(self) -> torch.Tensor:
        return getattr(self.owner(), self.parameter_name)

    def base_weight(self) -> torch.Tensor:
        return self.param()

    def base_weight_shape(self) -> tuple[int, ...]:
        return tuple(self.param().shape)

    # -- factors -----------------------------------------------------------------------------
    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int, parameter_name: str = "weight") -> dict[str, tuple]:
        """A (E·r × in), B (out × r·E)."""
        experts, fin, fout, _ = param_layout(base, parameter_name)
        return {"lora_A.weight": (r * experts, fin), "lora_B.weight": (fout, r * experts)}

    def _create(self, name: str, r: int) -> None:
        w = self.param()
        kw = {"device": w.device, "dtype": lora_dtype(w)}
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, **kw)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def reset(self, name: str, init) -> None:
        if init not in ("default", "gaussian", False):  # (checked by check_config before any change)
            raise ValueError(f"init={init!r} does not apply to a parameter target")
        super().reset(name, init)

    def _expert_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with ΔW = lhs @ rhs in the parameter's own layout: (E × out × r) @ (E × r × in),
        or for ``in_out`` (E × in × r) @ (E × r × out); 2-D: B (out × r), A (r × in)."""
        if self.param().dim() == 2:
            return b, a
        e = self.num_experts
        a3 = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        return (a3.transpose(1, 2), b3.transpose(1, 2)) if self.in_out else (b3, a3)

    def _delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        lhs, rhs = self._expert_factors(a.float(), b.float())
        return (lhs * scaling) @ rhs

    def effective(self, names: list[str]) -> torch.Tensor:
        """W + Σ s·ΔW of ``names``, in W's dtype, differentiable in the factors. In W's dtype
        the sum goes straight into one ``baddbmm`` / ``addmm`` per adapter (no ΔW temporary);
        otherwise (a half-precision W under fp32 factors) it is formed in fp32 and rounded once."""
        w = self.param()
        out = w if w.dtype == self.factors(names[0])[0].dtype else w.float()
        for n in names:
            a, b = self.factors(n)
            lhs, rhs = self._expert_factors(a.to(out.dtype), b.to(out.dtype))
            mm = torch.addmm if out.dim() == 2 else torch.baddbmm
            out = mm(out, lhs, rhs, alpha=self.scaling[n])
        return out.to(w.dtype)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.batch_adapters is not None or self._per_token():
            raise RuntimeError(
                f"LoRA on parameter {self.parameter_name!r} does not support mixed-adapter batches "
                "(nor does PEFT's ParamWrapper)"
            )
        live = [] if self.disabled else self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        self.check_merged_training()
        key, module = self.parameter_name, self.base_layer
        while isinstance(module, LoraParam):  # (the path to the parameter through nested wrappers)
            key, module = "base_layer." + key, module.base_layer
        return torch.func.functional_call(self.base_layer, {key: self.effective(live)}, args, kwargs)

    # -- merge (the base keeps W in the parameter, not in ``weight``) --------------------------
    def _merge_from_base(self, names: list[str]) -> None:
        factors = snapshot_factors(self, names)
        device = next(iter(factors.values()))[0].device
        self._merge_record = add_exactly(self.param(), self._applier(factors), factors, device)
        self.merged_adapters = list(names)

    def _restore_base(self) -> list[str]:
        record = self.__dict__.pop("_merge_record", None)
        if record is None:
            for n in reversed(self.merged_adapters):
                self._add_to_base(-self.delta_weight(n))
            self.merged_adapters = []
            return []
        device = next(iter(record.factors.values()))[0].device
        subtract_exactly(self.param(), self._applier(record.factors), record, device, self.parameter_name)
        changed = [n for n, f in record.factors.items() if n in self.r and not self._same_factors(n, *f)]
        self.merged_adapters = []
        return changed

    def nonfinite_merge(self, name: str | list[str]) -> str | None:
        """ "parameter" where merging would put NaN/Inf into it (computed on a copy), else None."""
        new = self.to_merge(name)
        if not new:
            return None
        with torch.no_grad():
            trial = self.param().detach().clone()
            self._applier(snapshot_factors(self, new))(trial, 1.0)
            return None if bool(torch.isfinite(trial).all()) else f"parameter {self.parameter_name!r}"

    def _add_to_base(self, delta: torch.Tensor) -> None:
        w = self.param()
        with torch.no_grad():
            w.copy_((w.float() + delta.to(w.device, torch.float32)).to(w.dtype))

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()


def param_layout(owner: nn.Module, name: str) -> tuple[int, int, int, bool]:
    """(experts E, in, out, in_out) of parameter ``name`` of ``owner`` as LoRA reads it: a 2-D
    (out × in) is one expert; a 3-D is (E × out × in), or (E × in × out) where the owner says
    ``is_transposed = True``."""
    while isinstance(owner, LoraParam):
        owner = owner.base_layer
    p = getattr(owner, name)
    if p.dim() == 2:
        return 1, p.shape[1], p.shape[0], False
    if p.dim() == 3:
        in_out = bool(getattr(owner, "is_transposed", False))
        e, d1, d2 = p.shape
        return (e, d1, d2, True) if in_out else (e, d2, d1, False)
    raise ValueError(
        f"target_parameters: {type(owner).__name__}.{name} has {p.dim()} dimensions; LoRA on a parameter "
        "takes a 2-D (out × in) or 3-D (experts × out × in) one"
    )


# -- finding and wrapping the parameters --------------------------------------------------------


@dataclasses.dataclass
class ParamTarget:
    """One matched parameter: ``key`` is its path with wrappers left out (``layers.0.mlp.experts.
    gate_up_proj``), as ``target_parameters`` and rank_pattern match it; ``path`` is where its
    wrapper sits once the adapter is in (``...experts`` or ``...experts.base_layer`` when nested)."""

    key: str
    module: str  # the owning module's path without wrappers
    name: str
    path: str


def _unwrapped(name: str) -> str:
    return name.replace(".base_layer", "")


def check_config(cfg) -> None:
    """The LoraConfig options that LoRA on a parameter cannot honour (PEFT refuses them too)."""
    bad = []
    if cfg.dropout:
        bad.append(f"dropout={cfg.dropout} (the input of B·A is not separable from W's)")
    if cfg.init not in ("default", "gaussian", False):
        bad.append(f"init={cfg.init!r}")
    bad += [f"{k}=True" for k in ("use_dora", "lora_bias", "fan_in_fan_out") if getattr(cfg, k)]
    if bad:
        raise ValueError(f"target_parameters does not work with {', '.join(bad)}")


def plan_parameters(model: nn.Module, cfg, module_targets: list[str], others: list) -> list[ParamTarget]:
    """The parameters ``cfg.target_parameters`` names, in the order PEFT wraps them, and where
    each wrapper will sit; checked before the model changes. A key matches as PEFT matches it:
    the parameter's unwrapped path equals an entry or ends with ``"." + entry``. ``others``: the
    configs of the adapters already on the model (all must target the same parameters)."""
    check_config(cfg)
    wanted = set(cfg.target_parameters)
    for other in others:
        if other.target_parameters and set(other.target_parameters) != wanted:
            raise ValueError(
                "every adapter that uses target_parameters must target the same parameters (as in PEFT): "
                f"got {sorted(wanted)}, an existing adapter has {sorted(other.target_parameters)}"
            )
    found: list[tuple[str, str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) or any(f".{k}." in f".{name}." for k in _INTERNALS):
            continue  # a wrapper holds no parameter of the model, and its factors are not targets
        owner = _unwrapped(name)
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{owner}.{pname}" if owner else pname
            if not any(key == t or key.endswith("." + t) for t in wanted):
                continue
            if not owner:
                raise ValueError(
                    f"target_parameters: {pname!r} belongs to the top-level module, which cannot be wrapped"
                )
            if (
                owner in module_targets
                or isinstance(model.get_submodule(owner), LoraLayer)
                and not isinstance(model.get_submodule(owner), LoraParam)
            ):
                raise ValueError(
                    f"target_parameters: {key!r} belongs to {owner!r}, which target_modules also adapts; "
                    "target a module or its parameters, not both"
                )
            found.append((key, owner, pname))
    if not found:
        return []
    plan = []
    for key, owner, pname in found:
        chain, module = [], model.get_submodule(owner)
        while isinstance(module, LoraParam):
            chain.append(module.parameter_name)
            module = module.base_layer
        if chain:  # a previous adapter wrapped this module: the new one joins its wrappers
            path = owner + ".base_layer" * chain.index(pname)
        else:  # fresh: later parameters of the same module wrap the earlier ones
            later = sum(1 for _, o, _ in found[found.index((key, owner, pname)) + 1 :] if o == owner)
            path = owner + ".base_layer" * later
        plan.append(ParamTarget(key, owner, pname, path))
    return plan


_INTERNALS = ("lora_A", "lora_B", "lora_dropout", "modules_to_save", "lora_embedding_A", "lora_embedding_B")


def expected_shapes(model: nn.Module, cfg, plan: list[ParamTarget], prefix: str) -> dict[str, tuple]:
    """File key -> shape of each planned parameter's factors (for checking a file before loading)."""
    out = {}
    for t in plan:
        r, _ = cfg.rank_and_alpha(t.key)
        for k, shape in LoraParam.factor_shapes(model.get_submodule(t.module), r, t.name).items():
            out[f"{prefix}{t.path}.{k}"] = shape
    return out


def inject_parameters(model: nn.Module, cfg, adapter: str, plan: list[ParamTarget]) -> None:
    """Wrap (or join the existing wrappers of) each planned parameter and add ``adapter`` to it."""
    for t in plan:
        module = model.get_submodule(t.module)
        layer = module
        while isinstance(layer, LoraParam) and layer.parameter_name != t.name:
            layer = layer.base_layer
        if not isinstance(layer, LoraParam):
            layer = LoraParam(module, t.name).train(module.training)
            replace_module(model, t.module, layer)
        r, alpha = cfg.rank_and_alpha(t.key)
        layer.add(adapter, r, alpha, 0.0, cfg.use_rslora, cfg.init)


__all__ = [
    "LoraParam",
    "ParamTarget",
    "check_config",
    "expected_shapes",
    "inject_parameters",
    "plan_parameters",
]
