"""Bottleneck adapters: ``BottleneckConfig`` and where they go in a transformer (``peft_type``
"BOTTLENECK", loraforge's own: PEFT has no bottleneck adapters).

Each decoder block gets, as AdapterHub does, a holder (``bottleneck_layer.BottleneckLayer``) named
``attention_adapters`` for its attention module's output (Houlsby's only) and one named
``output_adapters`` for its feed-forward module's output. Files: ``adapter_config.json`` (the
config below) and ``adapter_model.safetensors`` with AdapterHub's names less its
``.adapters.<name>`` segment:

    base_model.model.model.layers.0.output_adapters.adapter_down.0.weight   (d/r × d)   .adapter_down.0.bias
    base_model.model.model.layers.0.output_adapters.adapter_up.weight       (d × d/r)   .adapter_up.bias

(AdapterHub: ``model.layers.0.output_adapters.adapters.<name>.adapter_down.0.weight``;
``load_adapterhub`` reads its saved directories.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import _is_int, _is_number, build, check_dict_keys, check_file_keys
from .bottleneck_layer import INITS, NONLINEARITIES, PLACEMENTS, BottleneckLayer

PREFIX = "base_model.model."
# Module names in a decoder block, by family (Llama / Qwen / Mistral, GPT-2, others).
ATTENTION = ("self_attn", "attn", "attention", "self_attention")
FEED_FORWARD = ("mlp", "feed_forward", "ffn")
NORM_BEFORE_FF = ("post_attention_layernorm", "ln_2")
# A norm on the feed-forward's output (Gemma 2/3's "sandwich"): there post_attention_layernorm
# normalises the attention's output, so its input is no residual stream.
NORM_AFTER_FF = ("post_feedforward_layernorm",)
# The holders' names in a block (AdapterHub's), by the module whose output they change.
HOLDERS = {"attention": "attention_adapters", "feed_forward": "output_adapters"}
# AdapterHub's defaults per placement (its seq_bn, double_seq_bn, par_bn configs).
_DEFAULT_NONLINEARITY = {"pfeiffer": "relu", "houlsby": "swish", "parallel": "relu"}
_DEFAULT_SCALING = {"pfeiffer": 1.0, "houlsby": 1.0, "parallel": 4.0}


@dataclass
class BottleneckConfig:
    """Hyper-parameters of one bottleneck adapter.

    Per holder, A(v) = dropout(s · up(f(down(v)))) with down: d -> d // reduction_factor, up back
    to d (both with biases); see ``bottleneck_layer`` for where v comes from in each placement.

    placement: "pfeiffer" (after the feed-forward; AdapterHub's seq_bn), "houlsby" (after the
        attention and after the feed-forward; double_seq_bn) or "parallel" (beside the
        feed-forward; par_bn, He et al.).
    reduction_factor: d / bottleneck width (the width is at least 1).
    non_linearity: f: one of ``NONLINEARITIES`` ("relu", "gelu", "gelu_new", "swish", "silu",
        "tanh", "sigmoid", "leakyrelu"); None: AdapterHub's default for the placement (swish for
        houlsby, relu otherwise).
    scaling: s; None: AdapterHub's default (4.0 for parallel, 1.0 otherwise).
    dropout: dropout on the adapter's output while training.
    init_weights: "mam_adapter" (default: up = 0, so training starts at the base model), "bert"
        or "houlsby" (AdapterHub's other initialisations, both random up).
    leave_out: indices of the blocks that get no adapter (AdapterHub's name).
    """

    placement: str = "pfeiffer"
    reduction_factor: float = 16
    non_linearity: str | None = None
    scaling: float | None = None
    dropout: float = 0.0
    init_weights: str = "mam_adapter"
    leave_out: list[int] = field(default_factory=list)

    peft_type = "BOTTLENECK"
    method = "bottleneck"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"BottleneckConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}"
            )
        r = self.reduction_factor
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"BottleneckConfig.reduction_factor must be a positive number, got {r!r}")
        if self.non_linearity is None:
            self.non_linearity = _DEFAULT_NONLINEARITY[self.placement]
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NONLINEARITIES:
            raise ValueError(
                f"BottleneckConfig.non_linearity must be one of {sorted(NONLINEARITIES)}, "
                f"got {self.non_linearity!r}"
            )
        self.non_linearity = self.non_linearity.lower()
        if self.scaling is None:
            self.scaling = _DEFAULT_SCALING[self.placement]
        if not _is_number(self.scaling) or not math.isfinite(self.scaling):
            raise ValueError(f"BottleneckConfig.scaling must be a finite number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BottleneckConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_weights not in INITS:
            raise ValueError(
                f"BottleneckConfig.init_weights must be one of {INITS}, got {self.init_weights!r}"
            )
        if isinstance(self.leave_out, tuple):
            self.leave_out = list(self.leave_out)
        if not isinstance(self.leave_out, list) or not all(_is_int(i) and i >= 0 for i in self.leave_out):
            raise ValueError(
                f"BottleneckConfig.leave_out must be a list of block indices, got {self.leave_out!r}"
            )

    # -- dict / file mapping -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "BottleneckConfig") -> BottleneckConfig:
        """Build from a plain dict (YAML); unknown keys and bad values raise ``ValueError``."""
        check_dict_keys(data, [f.name for f in dataclasses.fields(cls)], source, "bottleneck config")
        return build(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_peft_dict(self, target_modules=None, **extra: Any) -> dict[str, Any]:
        """``adapter_config.json``: the fields, ``peft_type`` "BOTTLENECK" and PEFT's metadata keys
        (``target_modules`` is not used: the placement decides the modules)."""
        out = {
            "peft_type": self.peft_type,
            **self.to_dict(),
            "task_type": None,
            "base_model_name_or_path": None,
        }
        out.update(extra)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> BottleneckConfig:
        """The config an ``adapter_config.json`` describes: every value type-checked; an unknown key
        ignored with a warning when null / false / empty, refused otherwise."""
        if data.get("peft_type") != cls.peft_type:
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}; expected 'BOTTLENECK'")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        check_file_keys({k: v for k, v in data.items() if k not in known and k != "peft_type"}, source)
        return build(cls, kwargs, source)

    @classmethod
    def from_adapterhub(cls, config: dict[str, Any], source: str = "AdapterHub config") -> BottleneckConfig:
        """The config for an AdapterHub bottleneck config (``seq_bn``, ``double_seq_bn``, ``par_bn``
        and their variations in reduction factor, nonlinearity, scaling, dropout, init, leave_out);
        options loraforge does not build (layer norms inside the adapter, gating, PHM layers,
        invertible or cross-attention adapters, learned scaling, ...) are refused by name."""
        get = config.get
        shape = (
            get("mh_adapter"),
            get("output_adapter"),
            bool(get("is_parallel")),
            get("original_ln_before"),
        )
        placement = {
            (False, True, False, True): "pfeiffer",
            (True, True, False, False): "houlsby",
            (False, True, True, False): "parallel",
            (False, True, True, True): "parallel",  # (a parallel adapter reads the stream either way)
        }.get(shape)
        if placement is None:
            raise ValueError(
                f"{source}: mh_adapter={shape[0]}, output_adapter={shape[1]}, is_parallel={shape[2]}, "
                f"original_ln_before={shape[3]} is none of seq_bn, double_seq_bn, par_bn"
            )
        required = {
            "original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False,
            "ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False,
            "inv_adapter": None, "cross_adapter": False, "stochastic_depth": 0.0,
        }  # fmt: skip
        bad = [f"{k}={get(k)!r}" for k, v in required.items() if k in config and get(k) != v]
        if get("architecture", "bottleneck") not in (None, "bottleneck") or not _is_number(
            get("scaling", 1.0)
        ):
            bad.append(f"architecture={get('architecture')!r}, scaling={get('scaling')!r}")
        if bad:
            raise ValueError(f"{source}: loraforge does not build {', '.join(bad)}")
        return cls.from_dict(
            {
                "placement": placement,
                "reduction_factor": get("reduction_factor", 16),
                "non_linearity": get("non_linearity"),
                "scaling": get("scaling", 1.0),
                "dropout": get("dropout", 0.0),
                "init_weights": get("init_weights", "bert"),
                "leave_out": list(get("leave_out") or []),
            },
            source,
        )


CONFIGS = (BottleneckConfig,)


def adapterhub_keys(model: nn.Module, cfg: BottleneckConfig, name: str) -> dict[str, str]:
    """AdapterHub's key (``<block>.output_adapters.adapters.<name>.<param>``) for each of our
    file keys (``base_model.model.<block>.output_adapters.<param>``) of ``cfg`` on ``model``."""
    params = BottleneckLayer.shapes(_hidden(model), cfg.reduction_factor)
    out = {}
    for holder in find_targets(model, cfg):
        block, _, location = holder.rpartition(".")
        for param in params:
            out[f"{PREFIX}{holder}.{param}"] = f"{block}.{location}.adapters.{name}.{param}"
    return out


def from_adapterhub(model: nn.Module, cfg: BottleneckConfig, tensors: dict, name: str) -> dict:
    """AdapterHub's saved tensors of adapter ``name`` (``adapter.safetensors``) under loraforge's
    file keys (ValueError naming the first one missing)."""
    out = {}
    for ours, theirs in adapterhub_keys(model, cfg, name).items():
        if theirs not in tensors:
            raise ValueError(f"AdapterHub tensor {theirs!r} is missing")
        out[ours] = tensors[theirs]
    return out


def _child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(block, n, None), nn.Module)), None)


def blocks(model: nn.Module) -> list[tuple[str, nn.Module, dict[str, str | None]]]:
    """(path, block, {"attention", "feed_forward", "norm": child name}) for each decoder block: the
    children of the first ``nn.ModuleList`` whose members all have an attention and a
    feed-forward module."""
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        parts = [
            {
                "attention": _child(b, ATTENTION),
                "feed_forward": _child(b, FEED_FORWARD),
                "norm": _child(b, NORM_BEFORE_FF),
            }
            for b in module
        ]
        if all(p["attention"] and p["feed_forward"] for p in parts):
            return [(f"{path}.{i}", b, p) for i, (b, p) in enumerate(zip(module, parts))]
    raise ValueError(
        f"{type(model).__name__} has no list of transformer blocks with an attention ({'/'.join(ATTENTION)}) "
        f"and a feed-forward ({'/'.join(FEED_FORWARD)}) module: bottleneck adapters need one"
    )


def _plan(model: nn.Module, cfg: BottleneckConfig) -> list[tuple[str, str, str | None]]:
    """(holder path, path of the module it hooks, path of the norm whose input is the residual
    stream or None) per holder the adapter needs."""
    out = []
    found = blocks(model)
    missing = [i for i in cfg.leave_out if i >= len(found)]
    if missing:
        raise ValueError(
            f"leave_out: block(s) {missing} do not exist; the model has blocks 0-{len(found) - 1}"
        )
    for i, (path, block, parts) in enumerate(found):
        if i in cfg.leave_out:
            continue
        kinds = ("attention", "feed_forward") if cfg.placement == "houlsby" else ("feed_forward",)
        for kind in kinds:
            holder = getattr(block, HOLDERS[kind], None)
            if holder is not None and not isinstance(holder, BottleneckLayer):
                raise ValueError(
                    f"block {path!r} already has a {HOLDERS[kind]!r} of type {type(holder).__name__} "
                    "(a model prepared by another adapter library?)"
                )
            norm = None
            if cfg.placement != "houlsby":
                if _child(block, NORM_AFTER_FF):
                    raise ValueError(
                        f"a {cfg.placement} adapter reads the residual stream at the input of the norm "
                        f"before the feed-forward; block {path!r} also normalises the feed-forward's output, "
                        "so there is no such input (use placement='houlsby')"
                    )
                if parts["norm"] is None:
                    raise ValueError(
                        f"a {cfg.placement} adapter reads the residual stream at the input of the norm "
                        f"before the feed-forward ({'/'.join(NORM_BEFORE_FF)}); block {path!r} has none"
                    )
                norm = f"{path}.{parts['norm']}"
            out.append((f"{path}.{HOLDERS[kind]}", f"{path}.{parts[kind]}", norm))
    if not out:
        raise ValueError(f"leave_out={cfg.leave_out} leaves no block of {type(model).__name__} to adapt")
    return out


def find_targets(model: nn.Module, cfg: BottleneckConfig) -> list[str]:
    """The paths of the holders the adapter goes into (``<block>.attention_adapters`` /
    ``<block>.output_adapters``; created by ``inject`` where missing)."""
    return [holder for holder, _, _ in _plan(model, cfg)]


def _hidden(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not _is_int(hidden):
        raise ValueError(f"{type(model).__name__}.config.hidden_size is needed to size bottleneck adapters")
    return hidden


def _dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The adapter's dtype and device: those of the module's first floating parameter, fp32 over
    half precision (master weights, as LoRA's factors) or where it has none (a 4-bit module)."""
    for p in module.parameters():
        if p.is_floating_point():
            return (torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype), p.device
    p = next(module.parameters(), None)
    return torch.float32, (p.device if p is not None else torch.device("cpu"))


def inject(model: nn.Module, cfg: BottleneckConfig, adapter: str, targets: list[str]) -> None:
    """Add the adapter to each target holder, creating the holder (a child of its block, hooked
    onto the module whose output it changes) where there is none yet."""
    hidden = _hidden(model)
    plan = {holder: (module, norm) for holder, module, norm in _plan(model, cfg)}
    for path in targets:
        module_path, norm_path = plan[path]
        module = model.get_submodule(module_path)
        block_path, _, name = path.rpartition(".")
        holder = getattr(model.get_submodule(block_path), name, None)
        if holder is None:
            block = model.get_submodule(block_path)
            holder = BottleneckLayer().train(block.training)
            setattr(block, name, holder)
            holder.attach(module)
        norm = model.get_submodule(norm_path) if norm_path else None
        dtype, device = _dtype_device(module)
        holder.add(adapter, cfg, hidden, norm, dtype, device)


def expected_shapes(
    model: nn.Module, cfg: BottleneckConfig, targets: list[str]
) -> dict[str, tuple[int, ...]]:
    shapes = BottleneckLayer.shapes(_hidden(model), cfg.reduction_factor)
    return {f"{PREFIX}{path}.{name}": shape for path in targets for name, shape in shapes.items()}


def load_adapterhub(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> nn.Module:
    """Load a bottleneck adapter saved by AdapterHub's ``adapters`` library (``save_adapter(...,
    use_safetensors=True)``: ``adapter_config.json`` + ``adapter.safetensors``) into ``model``,
    under ``adapter`` (default: the name it was saved under), as ``lf.load_adapter`` loads ours:
    checked before the model changes, one clear error naming the file, the model untouched on
    failure. Configs loraforge does not build are refused (``BottleneckConfig.from_adapterhub``);
    ``pytorch_adapter.bin`` is not read (a pickle can run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from ..adapter_files import load_adapter
    from ..files import read_json_object

    root = Path(path)
    config_file, weights = root / "adapter_config.json", root / "adapter.safetensors"
    if not weights.exists():
        pickled = (
            " (only pytorch_adapter.bin, a pickle, which is not read)"
            if (root / "pytorch_adapter.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"{weights} is missing{pickled}")
    raw = read_json_object(config_file)
    if not isinstance(raw.get("config"), dict) or not str(raw.get("version", "")).startswith("adapters."):
        raise ValueError(f"{config_file}: not an AdapterHub adapter config (no 'config' object / 'version')")
    cfg = BottleneckConfig.from_adapterhub(raw["config"], source=str(config_file))
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e
    name = raw.get("name") or adapter or "default"
    ours = from_adapterhub(model, cfg, tensors, name)
    extra = sorted(set(tensors) - set(adapterhub_keys(model, cfg, name).values()))
    if extra:
        raise ValueError(f"{weights}: tensors that match no module of this model: {extra[:5]}")
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in ours.items()}, f"{tmp}/adapter_model.safetensors")
        Path(tmp, "adapter_config.json").write_text(json.dumps(cfg.to_peft_dict()))
        try:
            return load_adapter(model, tmp, adapter or name)
        except ValueError as e:  # (name the user's file, not the copy)
            msg = str(e).replace(f"{tmp}/adapter_model.safetensors", str(weights)).replace(tmp, str(root))
            raise ValueError(msg) from None


__all__ = [
    "HOLDERS",
    "adapterhub_keys",
    "from_adapterhub",
    "load_adapterhub",
    "CONFIGS",
    "BottleneckConfig",
    "BottleneckLayer",
    "blocks",
    "expected_shapes",
    "find_targets",
    "inject",
]
