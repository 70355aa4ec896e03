"""(IA)³: ``IA3Config`` and how its vectors are placed on a model (PEFT's ``peft_type`` "IA3").

Each target layer gets a learned vector per adapter (``ia3_l``, see ``ia3_layer``): feed-forward
targets scale their input, the others their output. Files are PEFT's: one tensor per target,
``base_model.model.<path>.ia3_l``, shape (1, in) or (out, 1).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import build, check_dict_keys, check_file_keys, module_spec
from ..injection import _find_saved, _output_head_names, candidates, name_matches
from ..kinds import replace_module
from ..layers import AdapterLayer, ModulesToSave, is_linear_like
from .ia3_layer import SUPPORTED, IA3Layer, is_supported, vector_shape

PREFIX = "base_model.model."

# PEFT's defaults when target_modules / feedforward_modules are not given, by model_type (the
# decoder families loraforge trains; PEFT resolves the same names on load).
DEFAULT_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}

# adapter_config.json keys of PEFT's IA3Config besides the metadata (config._METADATA).
_FIELDS = (
    "target_modules",
    "feedforward_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "modules_to_save",
    "init_ia3_weights",
)


@dataclass
class IA3Config:
    """Hyper-parameters of one (IA)³ adapter (Liu et al. 2022).

    A target layer y = W·x + b becomes y = W·(l ⊙ x) + b when it is a feed-forward module
    (l: 1 × in), else y = l ⊙ (W·x + b) (l: out × 1); l starts at ones (the base model).

    target_modules: a list of names (a module matches when its path equals a name or ends with
        ``"." + name``), a regex (full match on the path) or ``"all-linear"``; None: PEFT's default
        for the model's ``model_type`` (llama: k_proj, v_proj, down_proj).
    feedforward_modules: the targets whose input is scaled: a list (a target matches when its
        path ends with an entry, PEFT's rule) or a regex (full match); None: PEFT's default for
        the model type. A list must be a subset of a list ``target_modules`` (PEFT's rule).
    exclude_modules: same forms as ``target_modules``; matched modules are skipped.
    fan_in_fan_out: PEFT's flag for layers storing their weight (in × out), as GPT-2's Conv1D;
        loraforge detects such layers itself (kept for the file).
    modules_to_save: modules (e.g. a classifier head) trained in full, one copy per adapter.
    init_ia3_weights: True: vectors of ones; False: N(0, 1) values (PEFT's test init).
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    peft_type = "IA3"
    method = "ia3"

    def __post_init__(self) -> None:
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"IA3Config.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):
            setattr(self, name, module_spec(self, name))
        if self.feedforward_modules == "all-linear":
            raise ValueError(
                "IA3Config.feedforward_modules must name modules; 'all-linear' is for target_modules"
            )
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(v, str) for v in self.modules_to_save)
        ):
            raise ValueError(
                f"IA3Config.modules_to_save must be a list of module names, got {self.modules_to_save!r}"
            )
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ValueError(
                f"IA3Config.feedforward_modules must be a subset of target_modules (as in PEFT): "
                f"{sorted(set(ff) - set(targets))} are not targets"
            )

    # -- dict / PEFT mapping -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "IA3Config") -> IA3Config:
        """Build from a plain dict (YAML); unknown keys and bad values raise ``ValueError``."""
        check_dict_keys(data, [f.name for f in dataclasses.fields(cls)], source, "IA3 config")
        return build(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_peft_dict(self, target_modules: list[str] | str | None = None, **extra: Any) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT writes. ``target_modules`` overrides the stored value
        ("all-linear" is saved as the adapted paths); a list ``feedforward_modules`` is then
        narrowed to those paths too, so that PEFT's subset rule holds and PEFT loads the file
        (PEFT's own "all-linear" files fail that rule)."""
        targets = self.target_modules if target_modules is None else target_modules
        ff = self.feedforward_modules
        if isinstance(targets, list):
            targets = sorted(set(targets))
            if isinstance(ff, list) and not set(ff) <= set(targets):
                ff = [t for t in targets if _is_feedforward(ff, t)]
        out = {
            "peft_type": "IA3",
            "target_modules": targets,
            "feedforward_modules": ff,
            "exclude_modules": self.exclude_modules,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": self.modules_to_save,
            "init_ia3_weights": self.init_ia3_weights,
            "auto_mapping": None,
            "revision": None,
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
        }
        out.update(extra)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> IA3Config:
        """Map a PEFT IA3 ``adapter_config.json`` onto an IA3Config: every value type-checked;
        an unknown key ignored with a warning when null / false / empty, refused otherwise."""
        if data.get("peft_type") != "IA3":
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}; expected 'IA3'")
        kwargs = {k: v for k, v in data.items() if k in _FIELDS}
        check_file_keys({k: v for k, v in data.items() if k not in _FIELDS and k != "peft_type"}, source)
        return build(cls, kwargs, source)


CONFIGS = (IA3Config,)


def _is_feedforward(spec: list[str] | str, path: str) -> bool:
    """PEFT's rule: a regex must match the whole path; a list entry need only end it (no dot
    boundary: "proj" marks "down_proj")."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(key) for key in spec)


def _resolved(model: nn.Module, cfg: IA3Config) -> tuple[list[str] | str, list[str] | str]:
    """(target_modules, feedforward_modules), PEFT's defaults for the model type where None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = DEFAULT_TARGETS.get(model_type)
    targets, ff = cfg.target_modules, cfg.feedforward_modules
    for name, value, i in (("target_modules", targets, 0), ("feedforward_modules", ff, 1)):
        if value is None and default is None:
            known = ", ".join(sorted(DEFAULT_TARGETS))
            raise ValueError(
                f"IA3Config.{name} is required for {type(model).__name__} (model_type {model_type!r}); "
                f"PEFT's defaults cover {known}"
                + (" (pass feedforward_modules=[] when no target is feed-forward)" if i else "")
            )
    return (default[0] if targets is None else targets), (default[1] if ff is None else ff)


def find_targets(model: nn.Module, cfg: IA3Config) -> list[str]:
    """The paths of the layers ``cfg`` adapts (ValueError when none matches, or one is of a type
    (IA)³ does not support or already holds another method's adapter)."""
    spec, _ = _resolved(model, cfg)
    heads = _output_head_names(model) if spec == "all-linear" else set()
    out, linear_names = [], []
    for name, module, base in candidates(model):
        if isinstance(module, ModulesToSave):
            continue
        if is_linear_like(base):
            linear_names.append(name)
        hit = (
            (is_linear_like(base) and name not in heads) if spec == "all-linear" else name_matches(spec, name)
        )
        if not hit or (cfg.exclude_modules is not None and name_matches(cfg.exclude_modules, name)):
            continue
        if cfg.modules_to_save and name_matches(cfg.modules_to_save, name):
            continue
        if isinstance(module, AdapterLayer) and not isinstance(module, IA3Layer):
            raise ValueError(
                f"target {name!r} already holds a {module.method} adapter; (IA)³ cannot wrap it too"
            )
        if not is_supported(base):
            raise ValueError(
                f"target {name!r} is a {type(base).__name__}; (IA)³ supports {SUPPORTED} "
                "(name the leaf layers, e.g. 'down_proj')"
            )
        out.append(name)
    if not out:
        short = sorted({n.split(".")[-1] for n in linear_names})
        raise ValueError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}. "
            f"Linear-like modules it has: {short}"
        )
    return out


def _feedforward_of(model: nn.Module, cfg: IA3Config, targets: list[str]) -> dict[str, bool]:
    _, ff = _resolved(model, cfg)
    return {path: _is_feedforward(ff, path) for path in targets}


def inject(model: nn.Module, cfg: IA3Config, adapter: str, targets: list[str]) -> None:
    """Wrap each target in an ``IA3Layer`` (or add to the one there) and copy modules_to_save."""
    ff = _feedforward_of(model, cfg, targets)
    saved = _find_saved(model, cfg.modules_to_save) if cfg.modules_to_save else []
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, IA3Layer):
            module = replace_module(model, path, IA3Layer(module).train(module.training))
        module.add(adapter, ff[path], init=cfg.init_ia3_weights)
    for path in saved:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = replace_module(model, path, ModulesToSave(module).train(module.training))
        module.add(adapter)


def expected_shapes(model: nn.Module, cfg: IA3Config, targets: list[str]) -> dict[str, tuple[int, ...]]:
    """File key -> shape of each target's vector."""
    ff = _feedforward_of(model, cfg, targets)
    shapes = {}
    for path in targets:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, IA3Layer) else module
        shapes[f"{PREFIX}{path}.ia3_l"] = vector_shape(base, ff[path])
    return shapes


def add_weighted_adapter(model: nn.Module, names: list[str], weights: list[float], adapter_name: str) -> None:
    """``adapter_name``: on each layer l = Σ wᵢ·lᵢ over the adapters with a vector there (PEFT's
    rule), on the union of their targets; not activated. Refused where the adapters disagree on
    whether a layer's input or output is scaled, or where they have modules_to_save copies."""
    import torch

    from ..injection import adapter_layers
    from ..injection import inject as inject_adapter
    from ..registry import registry

    reg = registry(model)
    if adapter_name in reg:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if any(reg.configs[n].modules_to_save for n in names):
        raise ValueError(
            f"add_weighted_adapter: IA3 adapters {names} with modules_to_save cannot be combined"
        )
    feedforward = {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, IA3Layer):
            ff = {layer.feedforward[n] for n in names if n in layer.ia3_l}
            if len(ff) > 1:
                raise ValueError(
                    f"add_weighted_adapter: at {path!r} some of {names} scale the input, others the output"
                )
            if ff:
                feedforward[path] = ff.pop()
    targets = sorted({t for n in names for t in reg.targets[n]})
    cfg = dataclasses.replace(
        reg.configs[names[0]],
        target_modules=targets,
        feedforward_modules=[t for t in targets if feedforward.get(t)],
        exclude_modules=None,
    )
    inject_adapter(model, cfg, adapter=adapter_name)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l:
                new = layer.ia3_l[adapter_name]
                new.zero_()
                for n, w in zip(names, weights):
                    if n in layer.ia3_l:
                        new.add_(layer.ia3_l[n], alpha=w)


__all__ = [
    "CONFIGS",
    "IA3Config",
    "IA3Layer",
    "add_weighted_adapter",
    "expected_shapes",
    "find_targets",
    "inject",
]
