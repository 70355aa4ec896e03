"""Finding target modules and wrapping them: ``inject``, ``add_adapter``, parameter counts."""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from .config import LoraConfig
from .kinds import is_4bit, replace_module
from .layers import LoraLayer, ModulesToSave, dora, is_linear_like, wrap
from .registry import registry

# Where a block index sits in a module path, for layers_to_transform (PEFT's defaults).
_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def lora_layers(model: nn.Module):
    """(path, wrapper) for every LoRA wrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def candidates(model: nn.Module):
    """(path, module, base) for every module a config may target, wrapped or not (``base`` is a
    LoRA wrapper's ``base_layer``, else the module itself); wrapper internals are skipped."""
    inside = None  # named_modules() is pre-order: a wrapper's children follow it contiguously
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = None
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside = name + "."
        base = module.base_layer if isinstance(module, LoraLayer) else module
        yield name, module, base


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {"lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head or (isinstance(module, LoraLayer) and module.base_layer is head):
                heads.add(name)
    return heads


def name_matches(spec: list[str] | str, name: str) -> bool:
    """Whether module path ``name`` matches ``spec`` as PEFT matches ``target_modules``: a regex
    (a str) must match the whole path; a list entry must equal the path or its dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _layer_index(name: str, patterns) -> int | None:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or _LAYER_PATTERNS)
    for p in patterns:
        m = re.match(rf".*\.{p}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Dotted paths of the modules ``cfg`` adapts. Raises ValueError when none matches."""
    return _match_targets(model, cfg)[0]


def _match_targets(model: nn.Module, cfg: LoraConfig) -> tuple[list[str], list[str], str | None]:
    """(targets, unused, absent): the paths ``cfg`` adapts; the ``target_modules`` entries (of a
    list) that name no module at all; a message naming the ``layers_to_transform`` indices that
    no module matched by ``target_modules`` has (or None). Raises ValueError when there is no
    target."""
    if cfg.target_modules is None:
        raise ValueError("LoraConfig.target_modules is required: a list of names, a regex or 'all-linear'")
    heads = _output_head_names(model) if cfg.target_modules == "all-linear" else set()
    out, linear_names, named, seen_layers = [], [], set(), set()
    entries = cfg.target_modules if isinstance(cfg.target_modules, list) else []
    for name, module, base in candidates(model):
        named.update(key for key in entries if name == key or name.endswith("." + key))
        if isinstance(module, ModulesToSave):
            continue
        if is_linear_like(base):
            linear_names.append(name)
        if cfg.target_modules == "all-linear":
            hit = is_linear_like(base) and name not in heads
        else:
            hit = name_matches(cfg.target_modules, name)
        if not hit:
            continue
        if cfg.exclude_modules is not None and name_matches(cfg.exclude_modules, name):
            continue
        if cfg.layers_to_transform is not None:
            idx = _layer_index(name, cfg.layers_pattern)
            seen_layers.add(idx)
            if idx is None or idx not in cfg.layers_to_transform:
                continue
        if cfg.modules_to_save and name_matches(cfg.modules_to_save, name):
            continue
        out.append(name)
    unused = [key for key in entries if key not in named]
    absent = [i for i in cfg.layers_to_transform or [] if i not in seen_layers]
    absent_msg = _absent_layers_message(cfg, absent, seen_layers) if absent else None
    if not out and absent_msg and seen_layers:
        raise ValueError(absent_msg)
    if not out:
        short = sorted({n.split(".")[-1] for n in linear_names})
        raise ValueError(
            f"target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}. "
            f"Linear-like modules it has: {short}"
            + (f" (full paths e.g. {linear_names[:3]})" if linear_names else "")
        )
    for name in out:
        base = model.get_submodule(name)
        base = base.base_layer if isinstance(base, LoraLayer) else base
        wrap_check = (nn.Linear, nn.Embedding, nn.Conv2d)
        if not (isinstance(base, wrap_check) or is_linear_like(base)):
            raise ValueError(
                f"target {name!r} is a {type(base).__name__}; LoRA supports Linear, Embedding, Conv2d, "
                "GPT-2 Conv1D and 4-bit linears (name the leaf layers, e.g. 'q_proj')"
            )
    return out, unused, absent_msg


def _absent_layers_message(cfg: LoraConfig, absent: list[int], seen: set[int | None]) -> str:
    """One line saying which layers_to_transform indices the model lacks, and which it has."""
    have = sorted(i for i in seen if i is not None)
    pattern = cfg.layers_pattern or list(_LAYER_PATTERNS)
    if not have:
        return (
            f"layers_to_transform={cfg.layers_to_transform}: no module matched by target_modules has a "
            f"layer index in its path (looked for '.<pattern>.<i>.' with layers_pattern={pattern!r})"
        )
    valid = f"{have[0]}-{have[-1]}" if have == list(range(have[0], have[-1] + 1)) else str(have)
    plural = "indices" if len(absent) > 1 else "index"
    return (
        f"layers_to_transform: layer {plural} {absent} do{'es' if len(absent) == 1 else ''} not exist; "
        f"the modules matched by target_modules={cfg.target_modules!r} are in layers {valid}"
    )


def _find_saved(model: nn.Module, names: list[str]) -> list[str]:
    found = []
    for name, module, _ in candidates(model):
        if name_matches(names, name) and not isinstance(module, LoraLayer):
            found.append(name)
    missing = [n for n in names if not any(name_matches([n], f) for f in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    return found


def remove_modules(model: nn.Module, adapter: str) -> None:
    """Take ``adapter``'s factors and ``modules_to_save`` copies out of every layer, and put back
    the original module wherever no adapter is left (the inverse of :func:`inject`'s wrapping;
    the adapter's entry in the registry is the caller's)."""
    for name, layer in list(lora_layers(model)):
        if adapter in layer.r:
            layer.delete(adapter)
        if not layer.r:
            replace_module(model, name, layer.base_layer)
    for name, module in list(saved_modules(model)):
        if adapter in module.modules_to_save:
            module.delete(adapter)
        if not module.modules_to_save:
            replace_module(model, name, module.original_module)


def inject(model: nn.Module, cfg: LoraConfig, adapter: str = "default", strict: bool = False) -> nn.Module:
    """Add LoRA adapter ``adapter`` to ``model`` in place; freeze the base; return the model.

    The first call freezes every base parameter; each matched layer is wrapped (the original
    module becomes ``<path>.base_layer``). Calling it again on an adapted model adds another
    adapter, like :func:`add_adapter`. New LoRA modules (dropout included) take the mode,
    training or eval, of the layer they are added to.

    Entries of a ``target_modules`` list that name no module, and ``layers_to_transform``
    indices the model does not have, are reported in a warning, or with ``strict=True`` raise
    ValueError (before the model changes). No target at all always raises.
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"inject expects a loraforge.LoraConfig, got {type(cfg).__name__}")
    if not isinstance(adapter, str) or not adapter or adapter == "__base__" or "." in adapter:
        raise ValueError(f"invalid adapter name {adapter!r} (a non-empty name without dots, not '__base__')")
    reg = registry(model)
    if adapter in reg:
        raise ValueError(f"adapter {adapter!r} already exists; known adapters: {sorted(reg.names)}")
    refuse_unbuilt(cfg)
    if cfg.bias != "none" and any(c.bias != "none" for c in reg.configs.values()):
        # Biases belong to the base layers, so they are shared: only one adapter may own them (as in PEFT).
        raise ValueError("only one adapter may train biases; use bias='none' for the others")
    # Everything is validated before the model changes, so a bad config leaves it untouched.
    targets, unused, absent = _match_targets(model, cfg)
    problems = []
    if unused:
        problems.append(f"target_modules entries {unused} match no module of {type(model).__name__}")
    if absent:
        problems.append(absent)
    if problems and strict:
        raise ValueError(f"adapter {adapter!r}: " + "; ".join(problems))
    if problems:
        warnings.warn(
            f"adapter {adapter!r}: " + "; ".join(problems) + " (ignored; strict=True makes this an error)",
            stacklevel=2,
        )
    if cfg.init == "pissa" and any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError("init='pissa' changes the base weights; call lf.unmerge(model) first")
    if cfg.use_dora:
        dora.check_targets(model, targets)
    saved = _find_saved(model, cfg.modules_to_save) if cfg.modules_to_save else []
    if not reg.configs:  # the first adapter: freeze the base
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = wrap(module).train(module.training)
            replace_module(model, name, module)
        r, alpha = cfg.rank_and_alpha(name)
        module.add(adapter, r, alpha, cfg.dropout, cfg.use_rslora, cfg.init)
        if cfg.use_dora:
            dora.add_magnitude(module, adapter)
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module).train(module.training)
            replace_module(model, name, module)
        module.add(adapter)
    reg.add(adapter, cfg, targets)
    set_trainable(model)
    return model


# LoraConfig options that the config and the PEFT mapping know but the layers do not build yet:
# refused here, before the model changes, rather than silently trained as plain LoRA.
_UNBUILT = {
    "lora_bias": lambda c: c.lora_bias,
    "target_parameters": lambda c: c.target_parameters,
    "trainable_token_indices": lambda c: c.trainable_token_indices,
    "init": lambda c: c.init in (False, "olora", "loftq"),
}


def refuse_unbuilt(cfg: LoraConfig) -> None:
    for key, used in _UNBUILT.items():
        if used(cfg):
            raise ValueError(f"loraforge does not support {key}={getattr(cfg, key)!r} yet")


def add_adapter(model: nn.Module, adapter: str, cfg: LoraConfig, strict: bool = False) -> nn.Module:
    """Add a further named adapter (inactive until :func:`loraforge.set_adapter`); ``strict`` as
    in :func:`inject`."""
    if not registry(model).configs:
        raise ValueError("the model has no LoRA adapter yet; call lf.inject(model, cfg) first")
    return inject(model, cfg, adapter=adapter, strict=strict)


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (those the forward sums and that train)."""
    return list(registry(model).active)


def set_trainable(model: nn.Module) -> None:
    """Only the active adapters' LoRA factors (and their biases / saved modules) require grad."""
    active = set(active_adapters(model))
    for _, layer in lora_layers(model):
        layer.active_adapters = [a for a in active_adapters(model) if a in layer.r]
        for attr in layer.adapter_param_names:
            for name, p in getattr(layer, attr).named_parameters():
                p.requires_grad_(name.split(".")[0] in active)
    for _, module in saved_modules(model):
        module.active_adapters = [a for a in active_adapters(model) if a in module.modules_to_save]
        for name, sub in module.modules_to_save.items():
            for p in sub.parameters():
                p.requires_grad_(name in active)
    known = registry(model).configs
    modes = {known[a].bias for a in active if a in known}
    for name, p in model.named_parameters():
        if name.endswith("bias") and ".lora_" not in name and ".modules_to_save." not in name:
            p.requires_grad_(False)
    if "all" in modes:
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".lora_" not in name and ".modules_to_save." not in name:
                p.requires_grad_(True)
    elif "lora_only" in modes:
        for _, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.is_floating_point():
                bias.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A 4-bit packed weight counts 2 values per byte."""
    trainable = total = 0
    seen: set[int] = set()  # tied weights (GPT-2's lm_head = wte) count once
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if p.dtype == torch.uint8 and is_4bit(module):
                n *= 2
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: 1,536 || all params: 28,320 || trainable%: 5.4237``."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
