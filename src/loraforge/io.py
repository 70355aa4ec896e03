"""Adapter files in PEFT's format — the one place where names are converted.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are the
live parameter paths with ``base_model.model.`` in front and the adapter name taken out:

    live  model.layers.0.self_attn.q_proj.lora_A.pirate.weight      (r × in)
    file  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

Embeddings use ``lora_embedding_A`` (r × num) / ``lora_embedding_B`` (dim × r) without
``.weight``; ``modules_to_save`` copies are stored under the module's own path. Scaling is never
stored: it is recomputed from ``lora_alpha`` and ``r`` on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig
from .inject import _candidates, _matches, configs, find_targets, inject, lora_layers, saved_modules
from .layers import LoraLayer, _is_conv1d, _is_quantized

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0o022)  # os has no umask getter: read it and put it back at once
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp made it 0600; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    from .adapters import _check_known

    _check_known(model, adapter)
    cfg = configs(model)[adapter]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, adapter)
    targets = cfg.target_modules
    if targets == "all-linear":
        # PEFT saves "all-linear" expanded to the full paths of the layers it matched.
        targets = sorted(model.__dict__["_lf_targets"][adapter])
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_cfg = cfg.to_peft_dict(
        target_modules=targets, task_type=_task_type(model), base_model_name_or_path=base_name
    )
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(peft_cfg, indent=2, sort_keys=True)
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return out


def read_adapter(path: str | os.PathLike, adapter: str | None = None) -> tuple[LoraConfig, dict, dict]:
    """(config, raw config dict, tensors) of an adapter directory, with clear errors.

    Accepts a directory holding the two files, or (as PEFT writes non-default adapters) a parent
    directory with a sub-directory named after ``adapter``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter directory {str(root)!r} does not exist")
    if not (root / CONFIG_NAME).exists() and adapter and (root / adapter / CONFIG_NAME).exists():
        root = root / adapter
    cfg_file, weights = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: not an adapter directory")
    if not weights.exists():
        if (root / "adapter_model.bin").exists():
            raise ValueError(
                f"{root} holds adapter_model.bin (a pickle); loraforge reads only safetensors — "
                "convert it where you trust the file"
            )
        raise FileNotFoundError(f"{weights} is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object")
    cfg = LoraConfig.from_peft_dict(raw, source=str(cfg_file))
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e
    return cfg, raw, tensors


def _expected_shapes(model: nn.Module, cfg: LoraConfig, targets: list[str]) -> dict[str, tuple]:
    """File key → shape for the LoRA factors ``cfg`` would create on ``model``."""
    shapes: dict[str, tuple] = {}
    for path in targets:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        r, _ = cfg.rank_and_alpha(path)
        key = PREFIX + path
        if isinstance(base, nn.Embedding):
            num, dim = base.weight.shape
            shapes[f"{key}.lora_embedding_A"], shapes[f"{key}.lora_embedding_B"] = (r, num), (dim, r)
        elif isinstance(base, nn.Conv2d):
            shapes[f"{key}.lora_A.weight"] = (r, base.in_channels, *base.kernel_size)
            shapes[f"{key}.lora_B.weight"] = (base.out_channels, r, 1, 1)
        else:
            if _is_quantized(base):
                fin, fout = base.in_features, base.out_features
            elif _is_conv1d(base):
                fin, fout = base.weight.shape
            else:
                fin, fout = base.in_features, base.out_features
            shapes[f"{key}.lora_A.weight"], shapes[f"{key}.lora_B.weight"] = (r, fin), (fout, r)
    return shapes


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default") -> nn.Module:
    """Load a loraforge- or PEFT-written adapter into ``model`` under the name ``adapter``.

    Everything is checked before the model changes: a bad file, an adapter for another base
    (the first module whose shape differs is named with both shapes), an existing name — each
    raises and leaves the model exactly as it was. The first adapter loaded becomes active.
    """
    if adapter in configs(model):
        raise ValueError(f"adapter {adapter!r} already exists; known adapters: {sorted(configs(model))}")
    cfg, _, tensors = read_adapter(path, adapter)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{path}: tensor keys must start with {PREFIX!r}; found {bad[:3]}")
    targets = find_targets(model, cfg)
    expected = _expected_shapes(model, cfg, targets)
    # Modules_to_save and bias tensors are checked against the model's own tensors.
    live = {}
    names_to_save = cfg.modules_to_save or []
    for name, module, _ in _candidates(model):
        if names_to_save and _matches(names_to_save, name):
            src = module.original_module if hasattr(module, "original_module") else module
            for pname, t in src.state_dict().items():
                live[f"{PREFIX}{name}.{pname}"] = tuple(t.shape)
    # Bias keys name the wrapped path (`<layer>.base_layer.bias`); before injection it is `<layer>.bias`.
    # PEFT also saves whole embedding matrices when embeddings are targeted (save_embedding_layers).
    params = dict(model.named_parameters())
    embeddings = _embedding_weight_names(model)
    for key in tensors:
        name = _param_name(key, params)
        if key in expected or key in live or name is None:
            continue
        if name.endswith("bias") or name in embeddings:
            live[key] = tuple(params[name].shape)
    for key, shape in {**expected, **live}.items():
        if key not in tensors and key in expected:
            raise ValueError(
                f"{path}: tensor {key!r} is missing (the adapter does not cover module "
                f"{key[len(PREFIX) :].rsplit('.', 2)[0]!r})"
            )
        if key in tensors and tuple(tensors[key].shape) != tuple(shape):
            module = key[len(PREFIX) :]
            raise ValueError(
                f"{path}: shape mismatch for {module!r}: file has {tuple(tensors[key].shape)}, "
                f"model expects {tuple(shape)} — was this adapter trained on another base model?"
            )
    unexpected = sorted(set(tensors) - set(expected) - set(live))
    if unexpected:
        raise ValueError(
            f"{path}: tensors that match no module of this model: {unexpected[:5]}"
            + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        )
    inject(model, cfg, adapter=adapter)
    try:
        _copy_in(model, adapter, tensors)
    except BaseException:
        from .adapters import delete_adapter

        delete_adapter(model, adapter)
        raise
    return model


def _embedding_weight_names(model: nn.Module) -> set[str]:
    """Parameter names of the embedding matrices (input and output) — PEFT may save these whole."""
    names = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module, base in _candidates(model):
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


def _copy_in(model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    live = _live_tensors(model, adapter)
    missing = sorted(set(live) - set(tensors))
    if missing:
        raise ValueError(f"the adapter file lacks tensors the config implies: {missing[:5]}")
    params = dict(model.named_parameters())
    for key in set(tensors) - set(live):  # saved embedding matrices (validated by load_adapter)
        live[key] = params[_param_name(key, params)]
    with torch.no_grad():
        for key, dst in live.items():
            dst.copy_(tensors[key].to(device=dst.device, dtype=dst.dtype))


def _live_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """File key → the live tensor it loads into (not detached copies)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter not in layer.r:
            continue
        for attr in layer.adapter_param_names:
            item = getattr(layer, attr)[adapter]
            if isinstance(item, nn.Parameter):
                out[f"{PREFIX}{path}.{attr}"] = item
            else:
                out[f"{PREFIX}{path}.{attr}.weight"] = item.weight
    for path, module in saved_modules(model):
        if adapter in module.modules_to_save:
            for name, t in module.modules_to_save[adapter].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{name}"] = t
    cfg = configs(model)[adapter]
    params = dict(model.named_parameters())
    for name in _bias_names(model, cfg):
        out[PREFIX + name] = params[name]
    return out


__all__ = ["adapter_state_dict", "load_adapter", "read_adapter", "save_adapter"]
