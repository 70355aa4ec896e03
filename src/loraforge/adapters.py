"""Many adapters on one base: switch, disable, mix per row, merge / unmerge, delete, combine."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
from torch import nn

from . import merging
from .config import LoraConfig
from .injection import (
    active_adapters,
    adapter_layers,
    inject,
    lora_layers,
    remove_modules,
    saved_modules,
    set_trainable,
)
from .kinds import is_4bit, replace_module
from .layers import COMPUTE_MODES, AdapterLayer, LoraLayer, ModulesToSave, dora
from .methods import method_of
from .registry import drop_registry, registry


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were added."""
    return registry(model).names


def set_compute(model: nn.Module, mode: str) -> None:
    """Where a half-precision (bf16 / fp16) activation meets fp32 LoRA factors: ``"input"``
    (default) runs the low-rank branch in the activation's dtype with the factors cast to it
    (fp32 master weights, as under ``torch.autocast``); ``"adapter"`` casts the activation to fp32
    (PEFT's default). See ``loraforge.layers.LoraLayer``. fp32 models are the same either way."""
    if mode not in COMPUTE_MODES:
        raise ValueError(f"set_compute: mode must be one of {COMPUTE_MODES}, got {mode!r}")
    for _, layer in lora_layers(model):
        layer.compute = mode


def set_adapter(model: nn.Module, adapter: str | list[str]) -> None:
    """Make ``adapter`` (or several, summed) the active adapter(s); only they are trainable.

    Merged adapters that are not among the new active ones are unmerged first (with a warning,
    as PEFT does): otherwise their ΔW would stay in the base weights and apply on top of the
    new adapter. Merged adapters that stay active stay merged.
    """
    names = registry(model).check_known(adapter)
    leaving = [n for n in merged_adapters(model) if n not in names]
    if leaving:
        warnings.warn(f"set_adapter: unmerging {leaving}, which are no longer active", stacklevel=2)
        unmerge(model, leaving)
    registry(model).activate(names)
    set_trainable(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model behaves as the base model (merged adapters are taken out)."""
    layers = [m for _, m in adapter_layers(model)] + [m for _, m in saved_modules(model)]
    merged = {id(m): list(m.merged_adapters) for m in layers if isinstance(m, AdapterLayer)}
    previous = {id(m): m.disabled for m in layers}
    try:
        for m in layers:
            if isinstance(m, AdapterLayer):
                m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m in layers:
            m.disabled = previous[id(m)]
            if merged.get(id(m)):
                m.merge(merged[id(m)])


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: list[str]):
    """Run one adapter per batch row: ``names[i]`` for row i (``"__base__"`` = no adapter).

    The base layers run once for the whole batch; each LoRA layer gathers the rows' (A, B)
    factors and applies them with two batched matmuls (see ``LoraLinear._forward_mixed``). Where
    no gradient is needed the layers keep their stacked factors from call to call, inside the
    block and after it (a server runs batch after batch, a ``generate`` call step after step),
    until a factor, the batch's set of adapters or the dtype changes (see ``LoraLinear._stacks``).
    """
    names = registry(model).check_known(names, allow_base=True)
    layers = [m for _, m in adapter_layers(model)] + [m for _, m in saved_modules(model)]
    if any(isinstance(m, AdapterLayer) and m.merged_adapters for m in layers):
        raise RuntimeError("adapter_batch needs unmerged adapters; call lf.unmerge(model) first")
    previous = {id(m): m.batch_adapters for m in layers}
    try:
        for m in layers:
            m.batch_adapters = names
        yield model
    finally:
        for m in layers:
            m.batch_adapters = previous[id(m)]


def set_token_plan(model: nn.Module, plan) -> None:
    """Give every LoRA layer (and modules_to_save copy) of ``model`` a ``layers.tokens.TokenPlan``
    (None: take it away). While the plan is set (``plan.set(...)``), each forward adds each
    token's own adapter: a serving engine's mixed step. Layers wrapped later (an adapter loaded
    onto new target modules) need the call again."""
    for _, m in list(lora_layers(model)) + list(saved_modules(model)):
        m.token_plan = plan


def merge(model: nn.Module, adapter: str | list[str] | None = None, safe: bool = False) -> None:
    """Add ``s·B·A`` of the adapter(s) (default: the active ones) into the base weights.

    Idempotent: an adapter already merged is skipped. The merged weight is W0 + Σ s·B·A
    rounded once to the weight's dtype (a DoRA adapter merges as m/‖W0 + ΔW‖ ⊙ (W0 + ΔW) per
    output channel, adapters in turn, as PEFT does), and :func:`unmerge` gives W0 back bit for bit in every
    dtype, however many times one switches: each layer keeps the factors as merged and the few
    weights where subtracting would round elsewhere (see ``loraforge.layers.merge`` for the
    memory this takes: ~0.1 B per weight for a trained adapter, at most one copy of the weight).
    On a 4-bit base the sum is requantized and the mean absolute rounding error is reported in a
    warning (and kept in ``layer.merge_error``); unmerge puts the original 4-bit weight back.

    ``safe=True`` (PEFT's ``safe_merge``) first computes every merged weight on a copy and, if one
    would hold NaN or Inf, raises ValueError naming the layer and adapter, the model untouched.
    """
    names = registry(model).check_known(adapter if adapter is not None else active_adapters(model))
    _check_mergeable(model, names)
    for _, layer in lora_layers(model):  # (refused before any layer changes: grouped conv, ...)
        layer.to_merge([n for n in names if n in layer.r])
    if safe:
        check_merge_finite(model, names)
    errors = []
    for _, layer in adapter_layers(model):
        mine = [n for n in names if n in layer.adapters]
        if mine:
            layer.merge(mine)
            merge_error = getattr(layer, "merge_error", {})
            errors += [merge_error[n] for n in mine if n in merge_error]
    if errors:
        warnings.warn(
            f"merged into a 4-bit base: requantization changed weights by {sum(errors) / len(errors):.3g} "
            "on average (mean |error|); use merge_and_unload(model, dequantize=True) for an exact merge",
            stacklevel=2,
        )


def _check_mergeable(model: nn.Module, names: list[str]) -> None:
    """Refuse, before anything changes, to merge an adapter whose method cannot be merged."""
    for _, layer in adapter_layers(model):
        mine = [n for n in names if n in layer.adapters]
        if mine and layer.cannot_merge:
            raise ValueError(
                f"cannot merge {mine}: {layer.method} adapters cannot be merged into the base weights "
                f"({layer.cannot_merge}); keep them unmerged or use lf.unload(model)"
            )


def check_merge_finite(model: nn.Module, names: list[str]) -> None:
    """Raise ValueError if merging ``names`` would put NaN/Inf into any base weight or bias
    (each layer's merge computed on a copy: nothing changes). A holder takes part by defining
    ``nonfinite_merge(name) -> str | None`` (what would turn non-finite), as ``LoraLayer`` does."""
    for path, layer in adapter_layers(model):
        check = getattr(layer, "nonfinite_merge", None)
        for n in names:
            if check is not None and n in layer.adapters:
                bad = check(n)
                if bad is not None:
                    raise ValueError(
                        f"merge(safe=True): adapter {n!r} would put NaN/Inf into the {bad} of {path!r}; "
                        "nothing was merged"
                    )


def unmerge(model: nn.Module, adapter: str | list[str] | None = None) -> None:
    """Take merged adapter(s) (default: all) out of the base weights, which then equal their
    values before the merge bit for bit. An adapter whose factors were changed while merged is
    taken out as it was merged (the base is still exact), with a warning: the merged weights
    did not reflect the change, the unmerged forward from now on does."""
    names = None if adapter is None else registry(model).check_known(adapter)
    changed: list[str] = []
    for _, layer in adapter_layers(model):
        if names is None:
            changed += layer.unmerge()
        else:
            for name in names:
                changed += layer.unmerge(name)
    if changed:
        warnings.warn(
            f"unmerge: the factors of {sorted(set(changed))} changed while merged; the merged weights "
            "carried their values from merge time (the base is restored exactly)",
            stacklevel=2,
        )


def merged_adapters(model: nn.Module) -> list[str]:
    out: list[str] = []
    for _, layer in adapter_layers(model):
        out += [n for n in layer.merged_adapters if n not in out]
    return out


def _unwrap(model: nn.Module, merge_names: list[str] | None, dequantize: bool) -> nn.Module:
    # deepest first: a holder may sit inside another's base module
    for name, layer in reversed(list(adapter_layers(model))):
        if not isinstance(layer, LoraLayer):
            mine = [n for n in merge_names or [] if n in layer.adapters]
            if dequantize and is_4bit(layer.base_layer):  # (IA3 on a 4-bit base: merge in full precision)
                layer.unmerge()
                layer.base_layer = _dequantized_linear(layer.base_layer)
            if mine:
                layer.merge(mine)
            layer.unwrap(model, name)
            continue
        if merge_names:
            if dequantize and is_4bit(layer.base_layer):
                base = _dequantized_linear(layer.base_layer)
                todo = [n for n in merge_names if n in layer.r and n not in layer.merged_adapters]
                if any(dora.is_dora(layer, n) for n in todo):  # (DoRA rescales: not a sum of ΔW)
                    with torch.no_grad():
                        w = layer.base_layer.dequantize(torch.float32)
                        base.weight.copy_(dora.merge_dense(layer, w, todo))
                    replace_module(model, name, base)
                    continue
                delta = sum(
                    (
                        layer.delta_weight(n)
                        for n in merge_names
                        if n in layer.r and n not in layer.merged_adapters
                    ),
                    torch.zeros(()),
                )
                # (lora_bias: B's bias joins the base bias)
                todo = [n for n in merge_names if n in layer.r and n not in layer.merged_adapters]
                bias = layer._bias_delta(todo)
                with torch.no_grad():
                    base.weight.add_(delta.to(base.weight.dtype))
                    if bias is not None and base.bias is not None:
                        base.bias.add_(bias.to(base.bias.dtype))
                replace_module(model, name, base)
                continue
            for n in merge_names:
                if n in layer.r:
                    layer.merge(n)
        elif dequantize and is_4bit(layer.base_layer):
            replace_module(model, name, _dequantized_linear(layer.base_layer))
            continue
        replace_module(model, name, layer.base_layer)
    active = set(merge_names or [])
    for name, module in list(saved_modules(model)):
        chosen = [a for a in module.active_adapters if a in active]
        replace_module(model, name, module.modules_to_save[chosen[0]] if chosen else module.original_module)
    drop_registry(model)
    return model


def _dequantized_linear(q: nn.Module) -> nn.Linear:
    # in the weight's dtype before quantization, which is the rest of the model's: the compute
    # dtype may differ (an fp32 model with bf16 compute), and a bf16 layer would then refuse the
    # fp32 activations that the 4-bit layer took (it casts its input and output)
    weight = q.dequantize(torch.float32)
    state = getattr(q, "quant_state", None)
    dtype = getattr(state, "dtype", None) or getattr(q, "compute_dtype", None) or torch.float32
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    lin.requires_grad_(False)
    return lin


def merge_and_unload(
    model: nn.Module, adapter: str | list[str] | None = None, dequantize: bool = False, safe: bool = False
) -> nn.Module:
    """Merge the adapter(s) (default: active) and return the model with its original layer types.

    With ``dequantize=True`` a 4-bit base is replaced by a full-precision ``nn.Linear`` holding
    ``dequant(W) + s·B·A`` exactly — what one deploys. Without it the merged weight is requantized.
    ``safe=True``: as in :func:`merge`, refuse (the model untouched) if a weight would hold NaN/Inf.
    """
    names = registry(model).check_known(adapter if adapter is not None else active_adapters(model))
    _check_mergeable(model, names)
    for _, layer in lora_layers(model):
        layer.to_merge([n for n in names if n in layer.r])
    if safe:
        check_merge_finite(model, names)
    if not dequantize and any(is_4bit(m.base_layer) for _, m in adapter_layers(model)):
        merge(model, names)  # warns with the rounding error
        names = []
    return _unwrap(model, names or None, dequantize)


def unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Remove every adapter without merging and return the base model (merged ones are taken out)."""
    unmerge(model)
    return _unwrap(model, None, dequantize)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove an adapter everywhere; layers left without adapters get their base module back."""
    reg = registry(model)
    reg.check_known(adapter)
    layers = [m for _, m in adapter_layers(model)] + [m for _, m in saved_modules(model)]
    if any(m.batch_adapters is not None and adapter in m.batch_adapters for m in layers):
        # its rows would silently run on the base model for the rest of the block
        raise RuntimeError(
            f"adapter {adapter!r} is in use by an adapter_batch block; delete it after the block"
        )
    remove_modules(model, adapter)
    reg.remove(adapter)
    set_trainable(model)


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination: str = "linear",
    svd_rank: int | None = None,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
    svd_full_matrices: bool = False,
    svd_driver: str | None = None,
) -> None:
    """Create ``adapter_name`` from a weighted combination of existing adapters (PEFT's rules).

    - "cat": A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …] — exactly Σ wᵢsᵢBᵢAᵢ, rank Σ rᵢ.
    - "linear": A = Σ ±√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ — same rank; cross terms make it approximate.
    - "svd": the top-``svd_rank`` (default max rᵢ) SVD of Σ wᵢ ΔWᵢ.
    - "ties", "dare_linear", "dare_ties", "magnitude_prune": as "linear", the A factors and the
      B factors merged separately, each pruned to ``density`` (magnitude or DARE's random drop
      with 1/density rescale) and, for the TIES forms, sign-elected (``majority_sign_method``
      "total" or "frequency") and averaged over the agreeing adapters. Equal ranks.
    - "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd": the same merge of the
      full ΔWᵢ, then "svd"'s truncation. Any ranks.
    SVD options (PEFT's): ``svd_clamp`` clamps B = U·S and A = Vᵀ to the quantile's ±value;
    ``svd_full_matrices`` (False by default: the same factors without an out × out U);
    ``svd_driver`` (cuSOLVER's, CUDA only). See ``loraforge.merging`` for the maths and when each
    merge helps; DARE draws from torch's global generator: ``torch.manual_seed`` before the call
    reproduces PEFT's result. The new adapter has alpha = r (scaling 1) and is not activated.

    Fully trained ``modules_to_save`` copies cannot be combined: where two or more of the
    adapters have their own copy of one module this raises ValueError (as PEFT does); where one
    has, the new adapter gets a copy of that adapter's trained module.
    """
    reg = registry(model)
    names = reg.check_known(adapters)
    shared = [p for p, m in saved_modules(model) if sum(n in m.modules_to_save for n in names) > 1]
    if shared:
        raise ValueError(
            f"add_weighted_adapter: adapters {names} each have their own trained copy of modules_to_save "
            f"{shared}, which cannot be combined (as in PEFT); at most one of the adapters may have one"
        )
    for path, layer in lora_layers(model):  # (what combine_layer's A, B algebra does not cover)
        mine, base, why = [n for n in names if n in layer.r], layer.base_layer, None
        if any(layer.lora_bias_param(n) is not None for n in mine):
            why = "lora_bias adapters"
        elif mine and isinstance(base, nn.MultiheadAttention):
            why = "adapters on nn.MultiheadAttention"
        elif mine and getattr(base, "groups", 1) > 1:
            why = f"adapters on a grouped {type(base).__name__}"
        if why:
            raise ValueError(f"add_weighted_adapter cannot combine {why} (layer {path!r})")
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} adapters")
    merging.check_options(combination, density, majority_sign_method, svd_clamp, svd_driver)
    kinds = {type(reg.configs[n]) for n in names}
    if kinds != {LoraConfig}:  # (another method's adapters: combined by its own rule, where it has one)
        method = method_of(reg.configs[names[0]]) if len(kinds) == 1 else None
        if method is None or not hasattr(method, "add_weighted_adapter"):
            found = sorted(k.__name__ for k in kinds)
            raise ValueError(f"add_weighted_adapter combines LoRA adapters or IA3 adapters; got {found}")
        if combination != "linear":
            raise ValueError(
                f"add_weighted_adapter: {names} combine linearly only (combination='linear'), "
                f"got combination={combination!r}"
            )
        return method.add_weighted_adapter(model, names, list(weights), adapter_name)
    odd = [n for n in names if reg.configs[n].target_parameters or reg.configs[n].trainable_token_indices]
    if odd:  # (expert-stacked factors and replaced embedding rows are no rank-r products to mix)
        raise ValueError(
            f"add_weighted_adapter: adapters {odd} use target_parameters or trainable_token_indices, "
            "which cannot be combined"
        )
    if adapter_name in reg:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    doras = [n for n in names if reg.configs[n].use_dora]
    if doras:  # (DoRA's rescaling is not a sum of ΔW)
        raise ValueError(
            f"add_weighted_adapter combines LoRA updates s·B·A; {doras} use DoRA, whose per-channel "
            "magnitudes do not combine that way"
        )
    combination = "linear" if len(names) == 1 else combination  # (PEFT's rule, whatever was asked)
    ranks = {n: max([reg.configs[n].r, *reg.configs[n].rank_pattern.values()]) for n in names}
    new_rank = merging.new_rank(combination, ranks, svd_rank)
    targets = sorted({t for n in names for t in reg.targets[n]})
    first = reg.configs[names[0]]
    cfg = dataclasses.replace(
        first,
        r=new_rank,
        alpha=float(new_rank),
        target_modules=targets,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        init="default",
        modules_to_save=sorted({k for n in names for k in reg.configs[n].modules_to_save or []}) or None,
    )
    options = dict(
        density=density,
        majority_sign_method=majority_sign_method,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
    )
    for path, layer in lora_layers(model):  # (refused before the model changes)
        merging.check_layer(path, layer, [n for n in names if n in layer.r], combination)
    inject(model, cfg, adapter=adapter_name)  # (draws its init from torch's generator, as PEFT's does:
    # the DARE draws below then follow PEFT's under one seed)
    for _, module in saved_modules(model):
        if adapter_name in module.modules_to_save:  # the one adapter's trained copy (checked above)
            owner = next((n for n in names if n in module.modules_to_save), None)
            if owner is not None:
                module.modules_to_save[adapter_name].load_state_dict(
                    module.modules_to_save[owner].state_dict()
                )
    try:
        for _, layer in lora_layers(model):
            if adapter_name in layer.r:
                pairs = [(n, w) for n, w in zip(names, weights) if n in layer.r]
                layer.set_factors(
                    adapter_name, *merging.combine_layer(layer, pairs, combination, new_rank, **options)
                )
    except Exception:
        delete_adapter(model, adapter_name)  # (no half-combined adapter left behind)
        raise


__all__ = [
    "ModulesToSave",
    "adapter_batch",
    "set_token_plan",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "merge",
    "merge_and_unload",
    "merged_adapters",
    "set_adapter",
    "set_compute",
    "unload",
    "unmerge",
]
