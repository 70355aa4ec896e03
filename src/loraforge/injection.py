"""Finding target modules and wrapping them: ``inject``, ``add_adapter``, parameter counts."""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from . import loftq
from .config import LoraConfig
from .kinds import is_4bit, replace_module
from .layers import AdapterLayer, LoraLayer, ModulesToSave, dora, is_linear_like, wrap, wrapper_class
from .layers import param as param_targets
from .layers import trainable_tokens as token_targets
from .methods import method_of
from .registry import registry

# Where a block index sits in a module path, for layers_to_transform (PEFT's defaults).
_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def lora_layers(model: nn.Module):
    """(path, wrapper) for every LoRA wrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_layers(model: nn.Module):
    """(path, holder) for every adapter holder of any method (``layers.AdapterLayer``: LoRA
    wrappers, IA3 and bottleneck wrappers, prompt encoders)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
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
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            inside = name + "."
        base = module.base_layer if isinstance(module, AdapterLayer) else module
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
    if cfg.target_modules is None and cfg.target_parameters:
        return [], [], None  # (LoRA on parameters only: see layers/param.py)
    if cfg.target_modules is None:
        raise ValueError("LoraConfig.target_modules is required: a list of names, a regex or 'all-linear'")
    heads = _output_head_names(model) if cfg.target_modules == "all-linear" else set()
    out_projs = _attention_out_projs(model)
    out, linear_names, named, seen_layers = [], [], set(), set()
    entries = cfg.target_modules if isinstance(cfg.target_modules, list) else []
    for name, module, base in candidates(model):
        named.update(key for key in entries if name == key or name.endswith("." + key))
        if isinstance(module, ModulesToSave):
            continue
        if is_linear_like(base):
            linear_names.append(name)
        if cfg.target_modules == "all-linear":
            hit = is_linear_like(base) and name not in heads and name not in out_projs
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
    if not out and cfg.target_parameters:
        return out, unused, absent_msg
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
        if name in out_projs:
            attn = name.removesuffix("out_proj").rstrip(".")
            raise ValueError(
                f"target {name!r} is the out_proj of nn.MultiheadAttention {attn!r}, which reads its weight "
                f"without calling it; target {attn!r} instead (LoRA on in_proj and out_proj)"
            )
        try:
            kind = wrapper_class(base)
        except TypeError:
            raise ValueError(
                f"target {name!r} is a {type(base).__name__}; LoRA supports Linear, Embedding, Conv1d/2d/3d, "
                "MultiheadAttention, GPT-2 Conv1D and 4-bit linears (name the leaf layers, e.g. 'q_proj')"
            ) from None
        try:
            kind.check(base, cfg, cfg.rank_and_alpha(name)[0])
        except ValueError as e:
            raise ValueError(f"target {name!r}: {e}") from None
    return out, unused, absent_msg


def _attention_out_projs(model: nn.Module) -> set[str]:
    """Paths of the ``out_proj`` of every ``nn.MultiheadAttention``: a Linear whose forward the
    attention never calls (it reads the weight), so a LoRA wrapper there would be skipped."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


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
    # deepest first: a holder may sit inside another's base module (a bottleneck adapter around a
    # block whose linears carry LoRA)
    for name, layer in reversed(list(adapter_layers(model))):
        if adapter in layer.adapters:
            layer.delete(adapter)
        if not layer.adapters:
            layer.unwrap(model, name)
    for name, module in list(saved_modules(model)):
        if adapter in module.modules_to_save:
            module.delete(adapter)
        if not module.modules_to_save:
            replace_module(model, name, module.original_module)


def inject(model: nn.Module, cfg, adapter: str = "default", strict: bool = False) -> nn.Module:
    """Add adapter ``adapter`` to ``model`` in place; freeze the base; return the model.

    ``cfg`` is a ``LoraConfig`` or the config of another method (``IA3Config``,
    ``BottleneckConfig``, ``PrefixTuningConfig``, ``PromptTuningConfig``: ``loraforge.methods``).

    The first call freezes every base parameter; each matched layer is wrapped (the original
    module becomes ``<path>.base_layer``). Calling it again on an adapted model adds another
    adapter, like :func:`add_adapter`. New LoRA modules (dropout included) take the mode,
    training or eval, of the layer they are added to.

    Entries of a ``target_modules`` list that name no module, and ``layers_to_transform``
    indices the model does not have, are reported in a warning, or with ``strict=True`` raise
    ValueError (before the model changes). No target at all always raises.
    """
    method = None if isinstance(cfg, LoraConfig) else method_of(cfg)  # (TypeError for anything else)
    if not isinstance(adapter, str) or not adapter or adapter == "__base__" or "." in adapter:
        raise ValueError(f"invalid adapter name {adapter!r} (a non-empty name without dots, not '__base__')")
    reg = registry(model)
    if adapter in reg:
        raise ValueError(f"adapter {adapter!r} already exists; known adapters: {sorted(reg.names)}")
    if method is not None:
        targets = method.find_targets(model, cfg)  # (validates; the model is not changed yet)
        if not reg.configs:
            for p in model.parameters():
                p.requires_grad_(False)
        # (a method may return the config resolved for this model, e.g. dimensions it derives)
        cfg = method.inject(model, cfg, adapter, targets) or cfg
        reg.add(adapter, cfg, targets)
        set_trainable(model)
        return model
    if cfg.bias != "none" and any(getattr(c, "bias", "none") != "none" for c in reg.configs.values()):
        # Biases belong to the base layers, so they are shared: only one adapter may own them (as in PEFT).
        raise ValueError("only one adapter may train biases; use bias='none' for the others")
    # Everything is validated before the model changes, so a bad config leaves it untouched.
    targets, unused, absent = _match_targets(model, cfg)
    others = list(reg.configs.values())
    params = param_targets.plan_parameters(model, cfg, targets, others) if cfg.target_parameters else []
    if cfg.target_parameters and not params and not targets:
        what = type(model).__name__
        raise ValueError(f"target_parameters={cfg.target_parameters} matched no parameter of {what}")
    tokens = token_targets.plan_tokens(model, cfg, targets, adapter) if cfg.trainable_token_indices else []
    problems = []
    if cfg.target_parameters and not params:
        problems.append(f"target_parameters {cfg.target_parameters} match no parameter")
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
    merged = any(layer.merged_adapters for _, layer in lora_layers(model))
    if cfg.init in ("pissa", "olora", "loftq") and merged:
        raise ValueError(f"init={cfg.init!r} changes the base weights; call lf.unmerge(model) first")
    for name in targets if cfg.init == "loftq" else []:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        loftq.check_target(name, base, cfg.loftq_bits)
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
        module.loftq_settings = (cfg.loftq_bits, cfg.loftq_iter)
        module.add(adapter, r, alpha, cfg.dropout, cfg.use_rslora, cfg.init, lora_bias=cfg.lora_bias)
        if cfg.use_dora:
            dora.add_magnitude(module, adapter)
    param_targets.inject_parameters(model, cfg, adapter, params)
    token_targets.inject_tokens(model, adapter, tokens)
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module).train(module.training)
            replace_module(model, name, module)
        module.add(adapter)
    reg.add(adapter, cfg, targets)
    set_trainable(model)
    return model


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
    for _, layer in adapter_layers(model):
        layer.active_adapters = [a for a in active_adapters(model) if a in layer.adapters]
        for attr in layer.adapter_param_names:
            for name, p in getattr(layer, attr).named_parameters():
                p.requires_grad_(name.split(".")[0] in active)
    for _, module in saved_modules(model):
        module.active_adapters = [a for a in active_adapters(model) if a in module.modules_to_save]
        for name, sub in module.modules_to_save.items():
            for p in sub.parameters():
                p.requires_grad_(name in active)
    known = registry(model).configs
    modes = {getattr(known[a], "bias", "none") for a in active if a in known}
    # (an adapter's own biases, e.g. a prompt encoder's MLP, are the adapter's, not the base's)
    layers = [m for _, m in adapter_layers(model)]
    own = {id(p) for m in layers for a in m.adapter_param_names for p in getattr(m, a).parameters()}
    base_biases = [
        p
        for name, p in model.named_parameters()
        if name.endswith("bias") and id(p) not in own
        if ".lora_" not in name and ".modules_to_save." not in name
    ]
    for p in base_biases:
        p.requires_grad_("all" in modes)
    if "lora_only" in modes and "all" not in modes:
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
