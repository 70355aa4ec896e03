"""A model's shape without its weights: its ``config.json`` as a dict, and the model on the meta device.

``model_config_of(source)`` accepts what ``model.path`` accepts, plus the planner's shipped shapes:

* a model directory (its ``config.json``) or a ``config.json`` file;
* ``builtin:tiny-llama`` / ``builtin:small-llama`` (the config ``training/builtin.py`` builds);
* ``builtin:smollm2-135m-instruct`` or a ``.gguf`` file (the converted directory's config, see
  :mod:`loraforge.pretrained`);
* ``NAME``: a shipped shape, ``planning/shapes/NAME.json`` (public architecture numbers);
* a hub id, through transformers' ``AutoConfig`` (its cache or the hub).

``meta_model(config)`` builds the transformers causal LM of that config on the meta device: every
parameter has its shape and dtype and no storage, so a 70B config builds in seconds and nothing is
read but the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..training.config import ConfigError

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


def shipped_shapes() -> list[str]:
    """Names of the shapes shipped in ``planning/shapes/`` (``NAME.json``)."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json")) if SHAPES_DIR.is_dir() else []


def _read_json(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {path}: cannot read the model config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path}: a model config must be a JSON object, got {type(data).__name__}")
    return data


def model_config_of(source: str | Path | dict, key: str = "model.path") -> dict:
    """The model's transformers config as a plain dict (see the module docstring for ``source``).

    Raises ``ConfigError`` naming ``key`` and the source when there is no shape to be had."""
    if isinstance(source, dict):
        return dict(source)
    from ..training import builtin

    text = str(source)
    if builtin.is_builtin(text):
        name = text[len(builtin.PREFIX) :]
        if name not in builtin.MODELS:
            from ..pretrained import unknown_builtin

            raise ConfigError(f"{key}: {unknown_builtin(text)}")
        from transformers import LlamaConfig

        # the same config builtin.build_model builds (its vocabulary, special ids and shape)
        config = LlamaConfig(
            vocab_size=builtin.TOKENIZER_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            **builtin.MODELS[name],
        )  # fmt: skip
        return config.to_dict()
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _read_json(path, key)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_json(path / "config.json", key)
    if "/" not in text and not text.endswith(".gguf") and (SHAPES_DIR / f"{text}.json").is_file():
        return _read_json(SHAPES_DIR / f"{text}.json", key)
    if path.is_dir():
        raise ConfigError(f"{key}: {text}: no config.json, not a transformers model directory")
    from ..training.modeling import model_config

    try:
        return model_config(text, key).to_dict()  # builtin:smollm2, a .gguf (converted once), a hub id
    except ConfigError as e:
        shapes = shipped_shapes()
        hint = f"; shipped shapes: {', '.join(shapes)}" if shapes else ""
        raise ConfigError(f"{e}{hint}") from None


def transformers_config(model_config: dict | str | Path):
    """A transformers ``PretrainedConfig`` from a dict (``model_type`` picks the class) or a source."""
    from transformers import AutoConfig

    data = model_config if isinstance(model_config, dict) else model_config_of(model_config)
    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError("model config: no model_type (which transformers architecture is it?)")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model config: model_type {model_type!r}: {e}") from None


def meta_model(model_config: dict | str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of ``model_config`` on the meta device (shapes and dtypes, no storage).

    ``dtype``: the parameters' and floating buffers' dtype (default: float32), cast as
    ``training/builtin.py`` casts its models."""
    from transformers import AutoModelForCausalLM

    config = transformers_config(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype or torch.float32)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks of a causal LM (Llama-style ``model.layers``, GPT-2's ``h``)."""
    body = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"{type(model).__name__}: cannot find its decoder layers (model.layers / model.h)")
