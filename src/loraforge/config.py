"""LoRA configuration, validated, and its mapping to and from PEFT's ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

BIAS_MODES = ("none", "all", "lora_only")
# init=False (PEFT's init_lora_weights=False) is accepted too: B random, so the adapter starts away
# from the base model (for tests and for loading factors over it).
INIT_MODES = ("default", "gaussian", "pissa", "olora", "loftq")

# Keys of PEFT's LoraConfig (peft 0.21). Keys in this set that we do not model are accepted on load
# when they hold their PEFT default, and refused with a clear message otherwise: silently dropping
# e.g. `use_dora: true` would give wrong outputs.
_PEFT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None,
    "revision": None,
    "inference_mode": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "runtime_config": None,
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

    r: the rank, the inner dimension of ``B·A``.
    alpha: the scale's numerator: ``s = alpha / r``.
    dropout: dropout probability on the branch's input ``x`` (training only).
    use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA) instead of ``alpha / r``.
    target_modules: a list of names (a module matches when its dotted path equals a name or ends
        with ``"." + name``), a regex string (full match on the dotted path), or ``"all-linear"``
        (every Linear / GPT-2 Conv1D / 4-bit linear except the output head).
    exclude_modules: same forms; matched modules are skipped.
    bias: "none" | "all" (every bias in the model trains) | "lora_only" (biases of adapted layers).
    modules_to_save: names of modules (e.g. a classifier head) trained in full, one copy per adapter.
    layers_to_transform: indices of transformer blocks to adapt (``...layers.<i>.`` / ``...h.<i>.``).
    layers_pattern: name(s) of the block list that ``layers_to_transform`` indexes (``"layers"``,
        ``"h"``, ...); None = any of layers, h, block, blocks, layer.
    init: "default" (A Kaiming-uniform a=√5, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0),
        "pissa" (A, B from the top-r singular triplets of W0; W0 keeps the residual), "olora"
        (A, B from the QR decomposition of W0; W0 keeps the residual), "loftq" (A, B such that
        quantize(W0 - s·B·A) + s·B·A approximates W0 better than quantize(W0): see ``loftq_bits``),
        or False (A and B both random: ΔW ≠ 0 from the start; PEFT's testing init).
    use_dora: DoRA: the adapted weight is m · (W0 + s·B·A) / ‖W0 + s·B·A‖ (norm per output
        row), with the magnitude vector m (out) trained beside A and B, initialised to ‖W0‖.
    lora_bias: B gets a trainable bias (out), which merges into the base bias.
    target_parameters: names of bare ``nn.Parameter`` s (e.g. a mixture-of-experts module's
        ``experts.gate_up_proj``) that get LoRA on the parameter itself, as PEFT's ParamWrapper.
    trainable_token_indices: token ids whose embedding rows are trained (all other rows stay
        frozen): a list (the input embedding) or ``{module name: [ids]}``.
    loftq_bits / loftq_iter: for init="loftq": the quantization bits (4: NF4) and the number of
        alternating quantize / SVD rounds.
    fan_in_fan_out: PEFT's flag for layers that store their weight (in × out), as GPT-2's Conv1D
        does; loraforge detects such layers itself.
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
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_bits: int = 4
    loftq_iter: int = 1

    peft_type = "LORA"  # (a class attribute, not a field: the method, as adapter_config.json names it)

    def __post_init__(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive finite number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            # a string such as "no" is truthy: only real booleans are taken
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init is True:
            self.init = "default"
        if self.init is not False and self.init not in INIT_MODES:
            raise ValueError(f"LoraConfig.init must be one of {INIT_MODES} or false, got {self.init!r}")
        if self.lora_bias and self.init not in ("default", False):
            # (PEFT's rule: PiSSA / OLoRA / LoftQ change W0, and a bias on B would not be zero at start)
            raise ValueError(f"LoraConfig.lora_bias needs init 'default' or false, got {self.init!r}")
        if self.lora_bias and self.use_dora:  # (PEFT's rule: DoRA's rescaling would apply to B's bias)
            raise ValueError("LoraConfig.lora_bias is not supported with use_dora (as in PEFT)")
        if not _is_int(self.loftq_bits) or self.loftq_bits not in (2, 4, 8):
            raise ValueError(f"LoraConfig.loftq_bits must be 2, 4 or 8, got {self.loftq_bits!r}")
        if not _is_int(self.loftq_iter) or self.loftq_iter < 1:
            raise ValueError(f"LoraConfig.loftq_iter must be a positive integer, got {self.loftq_iter!r}")
        if isinstance(self.target_parameters, (tuple, str)):
            self.target_parameters = (
                [self.target_parameters]
                if isinstance(self.target_parameters, str)
                else list(self.target_parameters)
            )
        if self.target_parameters is not None and not all(isinstance(v, str) for v in self.target_parameters):
            raise ValueError(
                f"LoraConfig.target_parameters must be a list of names, got {self.target_parameters!r}"
            )
        self.trainable_token_indices = _check_token_indices(self.trainable_token_indices)
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            setattr(self, name, module_spec(self, name))
        if _is_int(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, list)
            and all(_is_int(i) and i >= 0 for i in self.layers_to_transform)
        ):
            raise ValueError(
                "LoraConfig.layers_to_transform must be a layer index or a list of them, "
                f"got {self.layers_to_transform!r}"
            )
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(v, str) for v in self.modules_to_save)
        ):
            raise ValueError(
                f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}"
            )
        _check_patterns(
            "rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v > 0, "a positive integer"
        )
        _check_patterns(
            "alpha_pattern",
            self.alpha_pattern,
            lambda v: _is_number(v) and math.isfinite(v) and v > 0,
            "a positive finite number",
        )

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
        """Build from a plain dict (YAML): PEFT's names are accepted (see :meth:`canonical_keys`);
        unknown keys and bad values raise ``ValueError``."""
        return build(cls, cls.canonical_keys(data, source), source)

    @classmethod
    def canonical_keys(cls, data: dict[str, Any], source: str = "LoraConfig") -> dict[str, Any]:
        """``data`` with PEFT's names mapped to loraforge's (values not yet checked).

        ``lora_alpha`` -> ``alpha``, ``lora_dropout`` -> ``dropout``, ``init_lora_weights`` ->
        ``init`` (``true`` -> "default", "gaussian", "pissa"/"pissa_niter_<k>" -> "pissa": loraforge
        takes the exact SVD). An unknown key raises ``ValueError`` naming the closest known one
        ("unknown LoRA config key 'rank' (did you mean 'r'?)"); so does a key given under both names.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = PEFT_NAMES.get(key, key)
            if name not in known:
                raise ValueError(
                    f"{source}: unknown LoRA config key {key!r}{_suggestion(str(key), known)}; "
                    f"known keys: {', '.join(known)} (and PEFT's {', '.join(PEFT_NAMES)})"
                )
            if name in out:
                raise ValueError(
                    f"{source}: {name!r} is given twice (as {name!r} and as PEFT's {_peft(name)!r})"
                )
            out[name] = init_from_peft(value, source, loading=False) if key == "init_lora_weights" else value
        return out

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
                "init_lora_weights": True if self.init == "default" else self.init,
                "layers_to_transform": self.layers_to_transform,
                "layers_pattern": self.layers_pattern,
                "fan_in_fan_out": self.fan_in_fan_out,
                "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern),
                "use_dora": self.use_dora,
                "lora_bias": self.lora_bias,
                "target_parameters": self.target_parameters,
                "trainable_token_indices": self.trainable_token_indices,
                "loftq_config": (
                    {"loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iter}
                    if self.init == "loftq"
                    else {}
                ),
                "inference_mode": True,
            }
        )
        out.update(extra)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Map a PEFT LoRA ``adapter_config.json`` onto a LoraConfig, refusing what we cannot honour.

        Every value is type-checked (booleans must be JSON booleans, ranks integers, numbers
        finite). A key this module does not know, as a newer PEFT may write, is ignored with a
        warning when it is null / false / empty (PEFT's way of saying "off") and refused otherwise.
        """
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(
                f"{source}: peft_type is {data.get('peft_type')!r}; loraforge loads LORA adapters"
            )
        if "r" not in data:
            raise ValueError(f"{source}: required key 'r' (the LoRA rank) is missing")
        kwargs: dict[str, Any] = {}
        others: dict[str, Any] = {}
        for key, value in data.items():
            if key == "peft_type":
                continue
            if key in _FROM_PEFT:
                if value is not None or key not in ("rank_pattern", "alpha_pattern"):
                    kwargs[_FROM_PEFT[key]] = value
            elif key == "init_lora_weights":
                kwargs["init"] = init_from_peft(value, source, loading=True)
            elif key == "loftq_config":
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"{source}: loftq_config must be an object, got {value!r}")
                for sub, sub_value in (value or {}).items():
                    if sub not in ("loftq_bits", "loftq_iter"):
                        raise ValueError(f"{source}: unknown loftq_config key {sub!r}")
                    kwargs[sub] = sub_value
            else:
                others[key] = value
        check_file_keys(others, source, _PEFT_DEFAULTS)
        # (a bad value names the field as the file spells it: lora_alpha, not LoraConfig.alpha)
        return build(cls, kwargs, source, rename=_peft)


# PEFT's names for LoraConfig fields, accepted wherever a LoraConfig is built from a mapping.
PEFT_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
# adapter_config.json keys honoured, mapped to LoraConfig fields (init_lora_weights is mapped by value).
_FROM_PEFT = {
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
    "use_dora": "use_dora",
    "lora_bias": "lora_bias",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}
# Keys that describe the file, not the adapter's maths: type-checked, otherwise not used.
_METADATA = {
    "task_type": str,
    "base_model_name_or_path": str,
    "revision": str,
    "peft_version": str,
    "megatron_core": str,
    "inference_mode": bool,
    "auto_mapping": dict,
}
# Names people type for which difflib finds nothing close enough.
_HINTS = {"rank": "r", "lora_r": "r", "lora_rank": "r"}


def _peft(field_name: str) -> str:
    """PEFT's name for a LoraConfig field."""
    return next((k for k, v in PEFT_NAMES.items() if v == field_name), field_name)


def _suggestion(key: str, known: list[str]) -> str:
    close = _HINTS.get(key) or next(iter(difflib.get_close_matches(key, known + list(PEFT_NAMES), n=1)), None)
    return f" (did you mean {close!r}?)" if close else ""


def init_from_peft(value: Any, source: str, loading: bool) -> str | bool:
    """loraforge's ``init`` for PEFT's ``init_lora_weights`` value.

    Loading, the factors come from the file, so inits that only shape A and B (false, "eva",
    "orthogonal") load as any other. PiSSA, OLoRA and LoftQ also change the base weight, which
    PEFT redoes on load and so does loraforge; inits that change the base in ways loraforge does
    not reproduce (CorDA, ...) are refused rather than loaded wrong.
    """
    if value is True:
        return "default"
    if isinstance(value, str):
        if value in INIT_MODES:
            return value
        if re.fullmatch(r"pissa_niter_\d+", value):
            return "pissa"
        if loading and value in ("eva", "orthogonal"):
            return "default"
    if value is False:
        return "default" if loading else False
    modes = "true, false, " + ", ".join(repr(m) for m in INIT_MODES[1:])
    if loading:
        why = f"loraforge loads adapters made with {modes}, 'eva' or 'orthogonal'"
    else:
        why = f"use {modes}"
    raise ValueError(f"{source}: init_lora_weights={value!r} is not supported: {why}")


def _check_token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` as a list of token ids or ``{module name: [ids]}``, checked."""
    if value is None:
        return None

    def ids(v: Any, where: str) -> list[int]:
        if isinstance(v, tuple):
            v = list(v)
        if not (isinstance(v, list) and v and all(_is_int(i) and i >= 0 for i in v)):
            raise ValueError(
                f"LoraConfig.trainable_token_indices{where} must be a non-empty list of token ids, got {v!r}"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"LoraConfig.trainable_token_indices{where} repeats a token id: {v!r}")
        return v

    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"LoraConfig.trainable_token_indices keys must be module names, got {value!r}")
        return {k: ids(v, f"[{k!r}]") for k, v in value.items()}
    return ids(value, "")


# -- shared by every method's config (LoraConfig here; methods/ for the others) -----------------


def module_spec(config: Any, name: str) -> list[str] | str | None:
    """A config's field that names modules, checked: a list of names (a tuple or set becomes a
    list), a regex string (compiled to check it), "all-linear", or None."""
    value = getattr(config, name)
    where = f"{type(config).__name__}.{name}"
    if isinstance(value, (tuple, set)):
        value = sorted(value) if isinstance(value, set) else list(value)
    if value is not None and not isinstance(value, (str, list)):
        raise ValueError(f"{where} must be a string, a list of strings or None, got {value!r}")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must hold strings, got {value!r}")
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{where} is not a valid regex: {value!r} ({e})") from None
    return value


def check_dict_keys(data: dict[str, Any], known: list[str], source: str, what: str, aliases=()) -> None:
    """Refuse a key of a config dict (YAML, kwargs) that is not a field: ValueError naming the
    closest known one (``aliases``: other accepted spellings, e.g. PEFT's)."""
    for key in data:
        if key not in known and key not in aliases:
            raise ValueError(
                f"{source}: unknown {what} key {key!r}{_suggestion(str(key), [*known, *aliases])}; "
                f"known keys: {', '.join(known)}"
            )


def check_file_keys(others: dict[str, Any], source: str, peft_defaults: dict[str, Any] | None = None) -> None:
    """Check the ``adapter_config.json`` keys a config class does not map onto a field: keys that
    describe the file (``_METADATA``) are type-checked; a key PEFT knows for this method
    (``peft_defaults``) is refused unless it holds its default; any other key is ignored with a
    warning when null / false / empty (PEFT's way of writing "off", as a newer PEFT writes its
    features) and refused otherwise, since silently dropping it could give wrong outputs."""
    unknown, unsupported, ignored = [], [], []
    for key, value in others.items():
        if key in _METADATA:
            if value is not None and not isinstance(value, _METADATA[key]):
                kind = {str: "a string", bool: "true or false", dict: "an object"}[_METADATA[key]]
                raise ValueError(f"{source}: {key} must be {kind} or null, got {value!r}")
        elif peft_defaults is not None and key in peft_defaults:
            default = peft_defaults[key]
            if not (_is_unset(value) or (value == default and type(value) is type(default))):
                unsupported.append(f"{key}={value!r}")
        elif _is_unset(value):
            ignored.append(key)
        else:
            unknown.append(f"{key}={value!r}")
    if unknown:
        raise ValueError(
            f"{source}: unknown config key(s) {', '.join(sorted(unknown))}: loraforge cannot honour "
            "them (a newer PEFT's feature?)"
        )
    if unsupported:
        raise ValueError(f"{source}: loraforge does not support {', '.join(unsupported)}")
    if ignored:
        warnings.warn(
            f"{source}: ignoring unknown key(s) {sorted(ignored)} (null/false/empty, as a newer PEFT "
            "writes features that are off)",
            stacklevel=3,
        )


def build(cls: type, kwargs: dict[str, Any], source: str, rename=None):
    """``cls(**kwargs)``; a bad value is one ValueError starting with ``source`` that names the
    field without the class (``rename``: a field's name as the file spells it)."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        name = rename or (lambda field_name: field_name)
        msg = re.sub(rf"{cls.__name__}\.(\w+)", lambda m: name(m.group(1)), str(e))
        raise ValueError(f"{source}: {msg}") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_unset(value: Any) -> bool:
    """PEFT's ways of writing "feature off": null, false, {} or []."""
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def _pattern_regex(key: str) -> str:
    # PEFT: a key matches when the module path ends with it at a dot boundary (regex allowed).
    return rf"(.*\.)?({key})$"


def _check_patterns(name: str, patterns: Any, ok, what: str) -> None:
    if not isinstance(patterns, dict):
        raise ValueError(f"LoraConfig.{name} must map module names (or regexes) to values, got {patterns!r}")
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise ValueError(f"LoraConfig.{name} keys must be strings, got {key!r}")
        try:
            re.compile(_pattern_regex(key))
        except re.error as e:
            raise ValueError(f"LoraConfig.{name} key {key!r} is not a valid regex ({e.msg})") from None
        if not ok(value):
            raise ValueError(f"LoraConfig.{name}[{key!r}] must be {what}, got {value!r}")


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module_name):
            return value
    return default
