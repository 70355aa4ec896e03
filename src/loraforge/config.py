"""LoRA configuration, validated, and its mapping to and from PEFT's ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "pissa")

# Keys of PEFT's LoraConfig (peft 0.21). Keys in this set that we do not model are accepted on load
# when they hold their PEFT default, and refused with a clear message otherwise: silently dropping
# e.g. `use_dora: true` would give wrong outputs.
_PEFT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None,
    "revision": None,
    "inference_mode": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "runtime_config": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
    "peft_version": None,
    "task_type": None,
    "base_model_name_or_path": None,
}


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter.

    For a frozen weight ``W0`` (out × in) the adapted layer computes
    ``h = W0·x + s·B·(A·dropout(x))`` with ``A`` (r × in), ``B`` (out × r) and
    ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).

    target_modules: a list of names (a module matches when its dotted path equals a name or ends
        with ``"." + name``), a regex string (full match on the dotted path), or ``"all-linear"``
        (every Linear / GPT-2 Conv1D / 4-bit linear except the output head).
    exclude_modules: same forms; matched modules are skipped.
    bias: "none" | "all" (every bias in the model trains) | "lora_only" (biases of adapted layers).
    modules_to_save: names of modules (e.g. a classifier head) trained in full, one copy per adapter.
    layers_to_transform: indices of transformer blocks to adapt (``...layers.<i>.`` / ``...h.<i>.``).
    init: "default" (A Kaiming-uniform a=√5, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0), or
        "pissa" (A, B from the top-r singular triplets of W0; W0 keeps the residual).
    rank_pattern / alpha_pattern: per-module overrides of r / alpha, keyed by a name or regex.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init: str = "default"
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"LoraConfig.init must be one of {INIT_MODES}, got {self.init!r}")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):
                value = sorted(value) if isinstance(value, set) else list(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"LoraConfig.{name} must be a string, a list of strings or None")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ValueError(f"LoraConfig.{name} must hold strings, got {value!r}")
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(f"LoraConfig.{name} is not a valid regex: {value!r} ({e})") from e
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, a in self.alpha_pattern.items():
            if not isinstance(a, (int, float)) or a <= 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be positive, got {a!r}")

    # -- per-module values -------------------------------------------------------------------
    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """r and alpha for one module, after ``rank_pattern`` / ``alpha_pattern`` (PEFT's rule)."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.alpha),
        )

    def scaling(self, module_name: str = "") -> float:
        r, alpha = self.rank_and_alpha(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- dict / PEFT mapping -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "LoraConfig") -> LoraConfig:
        """Build from a plain dict (YAML); unknown keys and bad values raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown LoRA config key(s) {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_peft_dict(self, target_modules: list[str] | str | None = None, **extra: Any) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT writes for this config.

        ``target_modules`` overrides the stored value: "all-linear" is saved expanded to the
        names that were actually adapted, as PEFT does.
        """
        targets = self.target_modules if target_modules is None else target_modules
        if isinstance(targets, list):
            targets = sorted(set(targets))
        # runtime_config is never written (PEFT warns on it); peft_version names PEFT's own release.
        out = {k: v for k, v in _PEFT_DEFAULTS.items() if k not in ("runtime_config", "peft_version")}
        out.update(
            {
                "peft_type": "LORA",
                "r": self.r,
                "lora_alpha": self.alpha,
                "lora_dropout": self.dropout,
                "target_modules": targets,
                "exclude_modules": self.exclude_modules,
                "bias": self.bias,
                "use_rslora": self.use_rslora,
                "modules_to_save": self.modules_to_save,
                "init_lora_weights": {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[self.init],
                "layers_to_transform": self.layers_to_transform,
                "layers_pattern": self.layers_pattern,
                "fan_in_fan_out": self.fan_in_fan_out,
                "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern),
                "inference_mode": True,
            }
        )
        out.update(extra)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Map a PEFT LoRA ``adapter_config.json`` onto a LoraConfig, refusing what we cannot honour."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(
                f"{source}: peft_type is {data.get('peft_type')!r}; loraforge loads LORA adapters"
            )
        mapping = {
            "r": "r",
            "lora_alpha": "alpha",
            "lora_dropout": "dropout",
            "target_modules": "target_modules",
            "exclude_modules": "exclude_modules",
            "bias": "bias",
            "use_rslora": "use_rslora",
            "modules_to_save": "modules_to_save",
            "layers_to_transform": "layers_to_transform",
            "layers_pattern": "layers_pattern",
            "fan_in_fan_out": "fan_in_fan_out",
            "rank_pattern": "rank_pattern",
            "alpha_pattern": "alpha_pattern",
        }
        kwargs: dict[str, Any] = {}
        unknown, unsupported = [], []
        for key, value in data.items():
            if key == "peft_type":
                continue
            if key in mapping:
                if value is not None or key not in ("rank_pattern", "alpha_pattern"):
                    kwargs[mapping[key]] = value
            elif key == "init_lora_weights":
                init = {True: "default", False: "default", "gaussian": "gaussian"}.get(value)
                if init is None and isinstance(value, str) and value.startswith("pissa"):
                    init = "pissa"
                # The init only matters when creating weights; a loaded adapter has its own.
                kwargs["init"] = init or "default"
            elif key in _PEFT_DEFAULTS:
                default = _PEFT_DEFAULTS[key]
                if value not in (default, None, {}, [], False) and key not in (
                    "task_type",
                    "base_model_name_or_path",
                    "revision",
                    "inference_mode",
                    "peft_version",
                    "auto_mapping",
                    "megatron_core",
                ):
                    unsupported.append(f"{key}={value!r}")
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {sorted(unknown)}")
        if unsupported:
            raise ValueError(f"{source}: loraforge does not support {', '.join(unsupported)}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT: a key matches when the module path ends with it at a dot boundary (regex allowed).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
