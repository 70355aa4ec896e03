"""Adapter files in PEFT's format — the one place where names are converted.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are the
live parameter paths with ``base_model.model.`` in front and the adapter name taken out:

    live  model.layers.0.self_attn.q_proj.lora_A.pirate.weight      (r × in)
    file  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

Embeddings use ``lora_embedding_A`` (r × num) / ``lora_embedding_B`` (dim × r) without
``.weight``; ``modules_to_save`` copies are stored under the module's own path. Scaling is never
stored: it is recomputed from ``lora_alpha`` and ``r`` on load.

A file is untrusted input: every tensor must be floating point and finite, and must stay finite
in the dtype it lands in; every config value is type-checked (``LoraConfig.from_peft_dict``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig
from .files import atomic_write, atomic_write_text, read_json_object
from .injection import (
    adapter_layers,
    candidates,
    find_targets,
    inject,
    lora_layers,
    name_matches,
    remove_modules,
    saved_modules,
)
from .kinds import is_4bit
from .layers import LoraLayer, dora, wrapper_class
from .layers import param as param_targets
from .layers import trainable_tokens as token_targets
from .methods import config_from_peft_dict, method_of
from .registry import registry

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# What a file's tensors may hold: anything else (integers, bools, float8) would be cast silently.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return None


def _bias_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    if cfg.bias == "all":
        return [
            n
            for n, p in model.named_parameters()
            if n.endswith("bias") and ".lora_" not in n and ".modules_to_save." not in n
        ]
    if cfg.bias == "lora_only":
        return [
            f"{path}.base_layer.bias"
            for path, layer in lora_layers(model)
            if getattr(layer.base_layer, "bias", None) is not None
        ]
    return []


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (detached, contiguous)."""
    return {k: v.detach().contiguous() for k, v in _live_tensors(model, adapter).items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default") -> Path:
    """Write one adapter as a PEFT directory (``adapter_config.json`` + safetensors), atomically."""
    reg = registry(model)
    reg.check_known(adapter)
    cfg = reg.configs[adapter]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, adapter)
    targets = getattr(cfg, "target_modules", None)
    if targets == "all-linear":
        # PEFT saves "all-linear" expanded to the full paths of the layers it matched.
        targets = sorted(reg.targets[adapter])
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_cfg = cfg.to_peft_dict(
        target_modules=targets, task_type=_task_type(model), base_model_name_or_path=base_name
    )
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(peft_cfg, indent=2, sort_keys=True)
    atomic_write_text(out / CONFIG_NAME, text)
    return out


def adapter_dir(path: str | os.PathLike, adapter: str | None = None) -> Path:
    """The directory holding the adapter's files: ``path``, or (as PEFT writes non-default
    adapters) its sub-directory named after ``adapter`` when only that one holds a config."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter directory {str(root)!r} does not exist")
    if not (root / CONFIG_NAME).exists() and adapter and (root / adapter / CONFIG_NAME).exists():
        root = root / adapter
    return root


def read_adapter(path: str | os.PathLike, adapter: str | None = None) -> tuple[object, dict, dict]:
    """(config, raw config dict, tensors) of an adapter directory (see :func:`adapter_dir`), with
    one clear error naming the file for a missing, pickled, truncated or malformed one."""
    root = adapter_dir(path, adapter)
    cfg_file, weights = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not weights.exists() and (root / "adapter_model.bin").exists():
        raise ValueError(
            f"{root}: only safetensors are read (a pickle can run code when loaded); found "
            f"adapter_model.bin and no {WEIGHTS_NAME} — convert it where you trust the file"
        )
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: not an adapter directory")
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing")
    raw = read_json_object(cfg_file)
    cfg = config_from_peft_dict(raw, source=str(cfg_file))  # (LoraConfig, or another method's)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        # (a truncated file, a bad header, an unknown dtype: the library's text, one line)
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e
    return cfg, raw, tensors


def _check_values(weights: Path, tensors: dict, own: dict, allow_nonfinite: bool) -> None:
    """Every tensor floating point, and finite unless ``allow_nonfinite`` (one pass per tensor).

    ``own``: file key -> the model's tensor for the keys that load into the model's own tensors
    (modules_to_save copies, biases): an integer buffer there must come with its own dtype.
    """
    for key, t in tensors.items():
        mine = own.get(key)
        if mine is not None and not mine.is_floating_point():  # e.g. a saved module's integer buffer
            if t.dtype != mine.dtype:
                raise ValueError(
                    f"{weights}: tensor {key!r} is {_name(t.dtype)}; the model's is {_name(mine.dtype)}"
                )
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{weights}: tensor {key!r} is {_name(t.dtype)}; adapter tensors must be float16, "
                "bfloat16, float32 or float64"
            )
        if not allow_nonfinite and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{weights}: tensor {key!r} holds {bad} NaN/Inf value(s) of {t.numel()} "
                "(pass allow_nonfinite=True to load it anyway)"
            )


def _expected_shapes(model: nn.Module, cfg: LoraConfig, targets: list[str]) -> dict[str, tuple]:
    """File key → shape for the LoRA factors ``cfg`` would create on ``model`` (each wrapper
    class says its own: ``LoraLayer.factor_shapes``)."""
    shapes: dict[str, tuple] = {}
    for path in targets:
        module = model.get_submodule(path)
        wrapped = isinstance(module, LoraLayer)
        base = module.base_layer if wrapped else module
        kind = type(module) if wrapped else wrapper_class(base)
        r, _ = cfg.rank_and_alpha(path)
        for name, shape in kind.factor_shapes(base, r).items():
            shapes[f"{PREFIX}{path}.{name}"] = shape
        if cfg.lora_bias:  # B's bias (out): B's first dimension
            shapes[f"{PREFIX}{path}.lora_B.bias"] = kind.factor_shapes(base, r)["lora_B.weight"][:1]
        if cfg.use_dora:
            shapes[f"{PREFIX}{path}.{dora.MAGNITUDE}"] = dora.magnitude_shape(base)
    return shapes


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter: str = "default", *, allow_nonfinite: bool = False
) -> nn.Module:
    """Load a loraforge- or PEFT-written adapter into ``model`` under the name ``adapter``.

    The file is checked before the model changes: a bad or truncated file, a config value of
    the wrong type, a tensor that is not floating point or holds NaN/Inf, an adapter for another
    base (the first module whose shape differs is named with both shapes), an existing name.
    A value that overflows the dtype it lands in (1e6 into a float16 bias) or a tensor the config
    implies but the file lacks is found while copying in; then, as on any failure, everything is
    put back: modules, base weights, ``requires_grad`` flags, active and registered adapters.
    Each error is one line naming the file. ``allow_nonfinite=True`` accepts NaN/Inf values (and
    overflow) for inspecting a broken run's adapter. The first adapter loaded becomes active.
    """
    reg = registry(model)
    if adapter in reg:
        raise ValueError(f"adapter {adapter!r} already exists; known adapters: {sorted(reg.names)}")
    cfg, _, tensors = read_adapter(path, adapter)
    weights = adapter_dir(path, adapter) / WEIGHTS_NAME
    method = None if isinstance(cfg, LoraConfig) else method_of(cfg)
    if method is None:
        bad = [k for k in tensors if not k.startswith(PREFIX)]
        if bad:
            raise ValueError(f"{weights}: tensor keys must start with {PREFIX!r}; found {bad[:3]}")
    try:
        targets = find_targets(model, cfg) if method is None else method.find_targets(model, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if method is None:
        expected = _expected_shapes(model, cfg, targets)
        if cfg.target_parameters:  # (LoRA on bare parameters: layers/param.py)
            plan = param_targets.plan_parameters(model, cfg, targets, list(registry(model).configs.values()))
            expected.update(param_targets.expected_shapes(model, cfg, plan, PREFIX))
        if cfg.trainable_token_indices:  # (trainable embedding rows: layers/trainable_tokens.py)
            tokens = token_targets.plan_tokens(model, cfg, targets, adapter)
            expected.update(token_targets.expected_shapes(model, tokens, PREFIX))
    else:
        expected = method.expected_shapes(model, cfg, targets)
    # Modules_to_save, bias and embedding tensors are checked against the model's own tensors.
    live = {}
    names_to_save = getattr(cfg, "modules_to_save", None) or []
    for name, module, _ in candidates(model):
        if names_to_save and name_matches(names_to_save, name):
            src = module.original_module if hasattr(module, "original_module") else module
            for pname, t in src.state_dict().items():
                live[f"{PREFIX}{name}.{pname}"] = t
    # Bias keys name the wrapped path (`<layer>.base_layer.bias`); before injection it is `<layer>.bias`.
    # PEFT also saves whole embedding matrices when embeddings are targeted (save_embedding_layers).
    params = dict(model.named_parameters())
    embeddings = _embedding_weight_names(model)
    for key in tensors if method is None else ():
        name = _param_name(key, params)
        if key in expected or key in live or name is None:
            continue
        if name.endswith("bias") or name in embeddings:
            live[key] = params[name]
    for key, shape in {**expected, **{k: tuple(t.shape) for k, t in live.items()}}.items():
        if key not in tensors and key in expected:
            raise ValueError(
                f"{weights}: tensor {key!r} is missing (the adapter does not cover module "
                f"{key.removeprefix(PREFIX).rsplit('.', 2)[0]!r})"
            )
        if key in tensors and tuple(tensors[key].shape) != tuple(shape):
            module = key.removeprefix(PREFIX)
            raise ValueError(
                f"{weights}: shape mismatch for {module!r}: file has {tuple(tensors[key].shape)}, "
                f"model expects {tuple(shape)} — was this adapter trained on another base model?"
            )
    unexpected = sorted(set(tensors) - set(expected) - set(live))
    if unexpected:
        raise ValueError(
            f"{weights}: tensors that match no module of this model: {unexpected[:5]}"
            + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        )
    _check_values(weights, tensors, live, allow_nonfinite)
    if method is None and cfg.init == "loftq" and any(_is_4bit_target(model, t) for t in targets):
        # LoftQ's 4-bit stage: the quantized base already holds Q and the file A, B (see loftq.py)
        cfg = dataclasses.replace(cfg, init="default")
    undo = _Undo(model, cfg, targets)
    try:
        inject(model, cfg, adapter=adapter)
        _copy_in(model, adapter, tensors, weights, allow_nonfinite)
    except BaseException as e:
        undo.restore(adapter)
        if isinstance(e, ValueError) and str(Path(path)) not in str(e):
            raise ValueError(f"{path}: {e}") from e
        raise
    return model


class _Undo:
    """What loading may change, recorded before it does, to put back exactly on any failure.

    Cheap: a flag per parameter, a copy of the adapter registry and the layers' active lists;
    base weights are copied only for a PiSSA / OLoRA / LoftQ adapter, whose injection changes
    each target weight in place.
    """

    def __init__(self, model: nn.Module, cfg: LoraConfig, targets: list[str]) -> None:
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.registry = registry(model).snapshot()
        holders = [m for _, m in adapter_layers(model)] + [m for _, m in saved_modules(model)]
        self.active = [(m, list(m.active_adapters)) for m in holders]
        self.weights = []
        if getattr(cfg, "init", None) in ("pissa", "olora", "loftq"):
            for name in targets:
                module = model.get_submodule(name)
                base = module.base_layer if isinstance(module, LoraLayer) else module
                if not is_4bit(base):
                    self.weights.append((base.weight, base.weight.detach().clone()))

    def restore(self, adapter: str) -> None:
        model = self.model
        remove_modules(model, adapter)  # and unwrap the layers this load wrapped
        with torch.no_grad():
            for weight, saved in self.weights:
                weight.copy_(saved)
        for holder, active in self.active:
            holder.active_adapters = active
        for p, flag in self.flags:
            p.requires_grad_(flag)
        registry(model).restore(self.registry)


def _is_4bit_target(model: nn.Module, path: str) -> bool:
    module = model.get_submodule(path)
    return is_4bit(module.base_layer if isinstance(module, LoraLayer) else module)


def _embedding_weight_names(model: nn.Module) -> set[str]:
    """Parameter names of the embedding matrices (input and output) — PEFT may save these whole."""
    names = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module, base in candidates(model):
        if isinstance(base, nn.Embedding) or (head is not None and base is head):
            names.add(f"{path}.base_layer.weight" if base is not module else f"{path}.weight")
    return names


def _param_name(key: str, params: dict) -> str | None:
    """The live parameter a file key names, whether or not its layer is wrapped yet."""
    name = key[len(PREFIX) :]
    for candidate in (
        name,
        name.replace(".base_layer.", "."),
        name.rsplit(".", 1)[0] + ".base_layer." + name.rsplit(".", 1)[-1],
    ):
        if candidate in params:
            return candidate
    return None


def _copy_in(
    model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor], weights: Path, allow_nonfinite: bool
) -> None:
    """Copy the file's tensors into the adapter's live ones; all are cast and checked first, so
    nothing is written (biases and saved embeddings are the base model's own) unless all fit."""
    live = _live_tensors(model, adapter)
    missing = sorted(set(live) - set(tensors))
    if missing:
        raise ValueError(
            f"{weights}: lacks tensors its config implies (bias="
            f"{getattr(registry(model).configs[adapter], 'bias', 'none')!r}, "
            f"modules_to_save): {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        )
    params = dict(model.named_parameters())
    for key in set(tensors) - set(live):  # saved embedding matrices (validated by load_adapter)
        live[key] = params[_param_name(key, params)]
    staged = {}
    for key, dst in live.items():
        value = tensors[key].to(device=dst.device, dtype=dst.dtype)
        # (finite in the file was checked; a narrower dtype may still overflow: 1e6 in float16)
        if not allow_nonfinite and value.dtype != tensors[key].dtype and not _all_finite(value):
            raise ValueError(
                f"{weights}: tensor {key!r} overflows {_name(dst.dtype)}, the "
                f"model's dtype for it (largest |value| {float(tensors[key].abs().max()):.4g})"
            )
        staged[key] = value
    with torch.no_grad():
        for key, dst in live.items():
            dst.copy_(staged[key])


def _live_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """File key → the live tensor it loads into (not detached copies)."""
    cfg = registry(model).configs[adapter]
    if not isinstance(cfg, LoraConfig) and hasattr(method_of(cfg), "live_tensors"):
        return method_of(cfg).live_tensors(model, adapter)
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        if adapter not in layer.adapters:
            continue
        for attr in layer.adapter_param_names:
            if adapter not in getattr(layer, attr):  # (a LoRA adapter beside a DoRA one)
                continue
            item = getattr(layer, attr)[adapter]
            if isinstance(item, nn.Parameter):
                out[f"{PREFIX}{path}.{attr}"] = item
            elif attr == dora.MAGNITUDE:  # (DoRA's m: PEFT's file key has no ".weight")
                out[f"{PREFIX}{path}.{attr}"] = item.weight
            else:  # a module: its weight (and bias, ...) under PEFT's `<attr>.weight`
                for name, t in item.state_dict(keep_vars=True).items():
                    out[f"{PREFIX}{path}.{attr}.{name}"] = t
    for path, module in saved_modules(model):
        if adapter in module.modules_to_save:
            for name, t in module.modules_to_save[adapter].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{name}"] = t
    if not isinstance(cfg, LoraConfig):
        return out
    params = dict(model.named_parameters())
    for name in _bias_names(model, cfg):
        out[PREFIX + name] = params[name]
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``: min and max propagate NaN and show an infinity (one fused pass
    and no mask tensor: several times faster than ``isfinite(t).all()`` on CPU)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo) and math.isfinite(hi)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["adapter_dir", "adapter_state_dict", "load_adapter", "read_adapter", "save_adapter"]
