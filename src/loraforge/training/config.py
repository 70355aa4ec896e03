"""Typed training configuration: dataclasses, YAML loading and dotted ``key=value`` overrides.

A YAML file gives values; the dataclasses below give names, types and defaults. Anything the
dataclasses do not know, and any value of the wrong type, is an error that names the key and
where it came from (the file, or the command line for overrides)::

    cfg = TrainConfig.from_yaml("configs/quickstart.yaml", ["lora.r=32", "train.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..config import PEFT_NAMES, LoraConfig, init_from_peft

Method = Literal["lora", "qlora", "full"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and its source."""


@dataclass
class QuantSection:
    """4-bit base weights for ``method: qlora`` (see ``loraforge.QuantConfig``)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    # "auto" = the model's dtype; matmuls run in this dtype after dequantizing a layer.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class ModelSection:
    # A transformers directory, a hub id, or "builtin:tiny-llama" (random weights, fixed seed,
    # built-in byte-level tokenizer; for tests and the quickstart).
    path: str = "builtin:tiny-llama"
    tokenizer: str | None = None  # default: the model path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None  # e.g. "sdpa", "eager", "flash_attention_2"
    quantization: QuantSection = field(default_factory=QuantSection)


@dataclass
class DataSection:
    train: str = ""  # JSONL / JSON / CSV / Parquet file, or builtin:NAME for a bundled file
    eval: str | None = None
    eval_fraction: float = 0.0  # hold out this share of `train` for eval when `eval` is unset
    format: Literal["auto", "text", "prompt_completion", "chat"] = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    max_length: int = 512
    packing: bool = False
    completion_only: bool = True  # loss on completions / assistant turns only
    skip_bad_rows: bool = False


@dataclass
class TrainSection:
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # linear/cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False
    # Exact fast forwards for Llama-family SwiGLU MLPs and RMSNorms (loraforge.training.fast):
    # fewer activations kept for backward, same loss and gradients. false = the models' own.
    fast_kernels: bool = True
    # torch.compile (TorchInductor) each decoder layer: the first step compiles (seconds), later
    # ones run faster: 0.56x the step time on an H100 at 1B size (0.63x with a 4-bit base), 0.90x
    # on the 2-core reference CPU at 1.2x its peak memory (BENCHMARKS.md). auto = on for CUDA runs of 300+
    # forward+backward passes (without gradient checkpointing), off elsewhere; true / false force it.
    compile: bool | str = "auto"
    # A bf16 / fp16 model's LoRA branch: "input" runs it in the model's dtype over fp32 master
    # factors (as torch.autocast would; 2.23x instead of 1.69x PEFT's throughput, 8.5 instead of
    # 11.0 GB peak for a 1B model on an H100), "adapter" in fp32 (PEFT's default). Same for fp32.
    lora_compute: Literal["input", "adapter"] = "input"
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    loss_chunk_size: int = 0  # tokens per LM-head chunk; 0 = automatic
    log_every: int = 1
    eval_every: int = 0  # 0 = only before and after training
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2  # newest N checkpoints kept on disk
    progress_bar: bool = True
    # Stop the run (an error naming the step) once this many steps in a row had a NaN/Inf loss or
    # gradient norm. Such a step makes no optimizer update, so the weights and every checkpoint stay
    # finite; the newest checkpoint is the last good one. 1 = stop at the first.
    max_nonfinite_steps: int = 1
    # Resuming with settings that differ from the checkpoint's in more than the keys safe to change
    # (resume.RESUMABLE_CHANGES: run length, log/eval/save intervals, device, kernels): "refuse" names
    # the keys; "apply" continues from the checkpoint's weights, optimizer moments, step and RNG with
    # the new values (new lr, betas, weight decay and schedule from the resume step on).
    resume_changes: Literal["refuse", "apply"] = "refuse"


@dataclass
class TrainConfig:
    """Everything one training run needs. ``loraforge train --help`` lists every key."""

    method: Method = "lora"
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=16.0, target_modules="all-linear"))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: str = "runs/latest"
    # false: start fresh (refuses an output dir that already holds checkpoints unless
    # overwrite: true); "auto": continue from the newest complete checkpoint if there is one;
    # or a checkpoint directory.
    resume: bool | str = False
    overwrite: bool = False

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: typing.Sequence[str] = ()) -> TrainConfig:
        path = str(path)
        try:
            raw = Path(path).read_bytes()
            data = yaml.load(raw.decode("utf-8"), Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:  # a directory, no permission, ...
            raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, overrides, source=path)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], overrides: typing.Sequence[str] = (), source: str = "<dict>"
    ) -> TrainConfig:
        data = _deepcopy(data)
        if isinstance(data.get("lora"), dict):
            data["lora"] = _lora_from_peft_names(data["lora"], source)
        sources: dict[str, str] = {}
        for item in overrides:
            key, value = parse_override(item)
            where = f"command-line override {item!r}"
            key = _check_key_path(cls, key, where)
            if key.startswith("lora.") and key.count(".") == 1 and key[5:] in PEFT_NAMES:
                [(leaf, value)] = _lora_from_peft_names({key[5:]: value}, where).items()
                key = "lora." + leaf
            _set_dotted(data, key, value)
            sources[key] = where
        cfg = _build(cls, data, prefix="", source=source, sources=sources)
        cfg.validate(source)
        return cfg

    @classmethod
    def load(
        cls, config: TrainConfig | dict | str | Path, overrides: typing.Sequence[str] = ()
    ) -> TrainConfig:
        """Accept a TrainConfig, a dict, or a YAML path (what ``lf.train`` takes)."""
        if isinstance(config, TrainConfig):
            if overrides:
                return cls.from_dict(config.to_dict(), overrides, source="<TrainConfig>")
            config.validate("<TrainConfig>")  # built in Python: its values were never checked
            return config
        if isinstance(config, dict):
            return cls.from_dict(config, overrides)
        return cls.from_yaml(config, overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, source: str = "<config>") -> None:
        """Checks that involve more than one value's type."""
        t, d = self.train, self.data

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {key}: {why}")

        if not d.train:
            raise bad("data.train", "required (a JSONL/JSON/CSV/Parquet file)")
        for key, value in _numbers(self, ""):
            if not math.isfinite(value):
                raise bad(key, f"must be a finite number, got {value!r}")
        positive = {
            "train.batch_size": t.batch_size,
            "train.grad_accum": t.grad_accum,
            "train.log_every": t.log_every,
            "data.max_length": d.max_length,
            "train.keep_checkpoints": t.keep_checkpoints,
            "train.max_nonfinite_steps": t.max_nonfinite_steps,
        }
        for key, value in positive.items():
            if value <= 0:
                raise bad(key, f"must be > 0, got {value}")
        non_negative = {
            "train.epochs": t.epochs,
            "train.max_steps": t.max_steps,
            "train.warmup_steps": t.warmup_steps,
            "train.eval_every": t.eval_every,
            "train.save_every": t.save_every,
            "train.max_grad_norm": t.max_grad_norm,
            "train.weight_decay": t.weight_decay,
            "train.loss_chunk_size": t.loss_chunk_size,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise bad(key, f"must be >= 0, got {value}")
        if t.epochs == 0 and t.max_steps == 0:
            raise bad("train.max_steps", "set train.epochs or train.max_steps to a positive number")
        if not t.lr > 0:
            raise bad("train.lr", f"must be > 0, got {t.lr}")
        if not 0 <= t.min_lr_ratio <= 1:
            raise bad("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise bad("train.betas", f"must be two numbers in [0, 1), got {t.betas}")
        if not 0 <= d.eval_fraction < 1:
            raise bad("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
        if isinstance(self.resume, str) and self.resume != "auto" and not Path(self.resume).is_dir():
            raise bad(
                "resume", f"expected false, true, 'auto' or a checkpoint directory, got {self.resume!r}"
            )
        if isinstance(t.compile, str) and t.compile != "auto":
            raise bad("train.compile", f"expected true, false or auto, got {t.compile!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", t.device):
            raise bad("train.device", f"expected auto, cpu, cuda or cuda:N, got {t.device!r}")


# -- YAML --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_override(item: str) -> tuple[str, Any]:
    """``"lora.r=32"`` -> ``("lora.r", 32)``; the value is read as YAML (``[a, b]`` is a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command-line override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command-line override {item!r}: cannot read value: {e}") from None
    return key.strip(), value


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(data.get(p), dict):
            data[p] = {}
        data = data[p]
    data[leaf] = value


# -- typed construction ---------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Names from PEFT / transformers' TrainingArguments that difflib would not match to ours.
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "schedule",
    "max_seq_length": "max_length",
    "model_name_or_path": "path",
    "output_dir": "output",
    "torch_dtype": "dtype",
}


def _lora_from_peft_names(section: dict, where: str) -> dict:
    """The ``lora`` section with PEFT's key names renamed to loraforge's (``lora_alpha`` ->
    ``alpha``, ``lora_dropout`` -> ``dropout``, ``init_lora_weights`` -> ``init``, its value read
    as :func:`loraforge.config.init_from_peft` reads it)."""
    out = {}
    for key, value in section.items():
        name = PEFT_NAMES.get(key, key)
        if name in out or (name != key and name in section):
            raise ConfigError(f"{where}: lora: both {name!r} and PEFT's name {key!r} are set; keep one")
        if key == "init_lora_weights":
            try:
                value = init_from_peft(value, f"{where}: lora", loading=False)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        out[name] = value
    return out


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        keys += (
            _all_keys(hint, prefix + f.name + ".") if dataclasses.is_dataclass(hint) else [prefix + f.name]
        )
    return keys


def _unknown(key: str, known: typing.Iterable[str], where: str) -> ConfigError:
    """An unknown-key error with the closest known key: a PEFT / transformers synonym, a close
    spelling at the same level, or the same name in another section (``lr`` -> ``train.lr``)."""
    known = sorted(known)
    leaf = key.rsplit(".", 1)[-1]
    wanted = SYNONYMS.get(leaf, PEFT_NAMES.get(leaf, leaf))
    close = [wanted] if wanted in known else []
    close = close or [k for k in _all_keys(TrainConfig) if k.rsplit(".", 1)[-1] == wanted][:1]
    close = close or difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; known keys here: {', '.join(known)}")


def _check_key_path(cls: type, key: str, where: str) -> str:
    """Refuse an override for a key the dataclasses do not have; returns the key (PEFT's names
    in the ``lora`` section accepted)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if cls is LoraConfig and part in PEFT_NAMES and i == len(parts) - 1:
            return key
        if part not in names:
            raise _unknown(".".join(parts[: i + 1]), names, where)
        hint = _hints(cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(hint):
                raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])!r} has no sub-keys")
            cls = hint
    return key


def _numbers(obj: Any, prefix: str) -> typing.Iterator[tuple[str, float]]:
    """(dotted key, value) of every float in a config dataclass, in lists and dict values too."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _numbers(getattr(obj, f.name), prefix + f.name + ".")
    elif isinstance(obj, float):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}{k}.")


def _build(cls: type, data: Any, prefix: str, source: str, sources: dict[str, str]) -> Any:
    where = sources.get(prefix.rstrip("."), source)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.')!r} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = prefix + str(key)
        if key not in names:
            raise _unknown(path, names, sources.get(path, source))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path + ".", source, sources)
        else:
            kwargs[key] = _coerce(value, hint, path, sources.get(path, source))
    if cls is LoraConfig:
        # LoRA sections start from loraforge's training defaults, not LoraConfig's bare ones.
        kwargs = {"r": 8, "alpha": 16.0, "target_modules": "all-linear", **kwargs}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {e}") from None


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, path: str, where: str) -> Any:
    """Return ``value`` checked against the type ``hint`` (ints are accepted for floats)."""

    def fail() -> ConfigError:
        return ConfigError(
            f"{where}: {path}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        )

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise fail()
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, path, where)
            except ConfigError:
                continue
        raise fail()
    if hint is type(None):
        if value is None:
            return None
        raise fail()
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        return [_coerce(v, args[0], f"{path}[{i}]", where) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        if not args:
            return value
        return {
            _coerce(k, args[0], path, where): _coerce(v, args[1], f"{path}.{k}", where)
            for k, v in value.items()
        }
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond the float range
                number = math.inf
            # .inf / .nan are valid YAML floats, but no rate, norm or ratio may be one
            if not math.isfinite(number):
                shown = repr(value) if isinstance(value, float) else "an integer beyond the float range"
                raise ConfigError(f"{where}: {path}: must be a finite number, got {shown}")
            return number
        raise fail()
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail()
    return value


def describe_keys() -> str:
    """Every config key with its type and default, one a line (for ``loraforge train --help``)."""
    lines: list[str] = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], value, prefix + f.name + ".")
            else:
                lines.append(f"  {prefix + f.name:<32} {_type_name(hints[f.name]):<44} default: {value!r}")

    walk(TrainConfig, TrainConfig(), "")
    return "\n".join(lines)
