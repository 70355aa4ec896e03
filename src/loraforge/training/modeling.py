"""Load the tokenizer and base model, and make it trainable by ``method`` (lora | qlora | full)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..adapter_files import save_adapter
from ..injection import inject
from ..model_files import ModelNotFoundError, check_model_source, load_model
from ..pretrained import base_name, unknown_builtin
from ..pretrained import resolve as resolve_pretrained
from ..quant import QuantConfig
from ..quant.linear4bit import quantize as quantize_4bit
from . import builtin
from .config import ADAPTER_SECTIONS, ConfigError, ModelSection, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto`` = bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        cuda = device is not None and device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_tokenizer(path: str):
    """The tokenizer at ``path`` (or the built-in one), with a pad token."""
    if builtin.is_builtin(path):
        tok = builtin.build_tokenizer()
    else:
        from transformers import AutoTokenizer

        check_model_source(path)  # no such directory / hub unreachable: one line, at once
        tok = AutoTokenizer.from_pretrained(resolve_pretrained(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are never trained, any id will do
    return tok


def check_device(name: str, key: str = "train.device") -> None:
    """Refuse a device this machine does not have (``cuda`` without CUDA, ``cuda:3`` with two
    GPUs) in one line naming ``key``, before anything is loaded; ``auto`` always works."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "no GPU is visible"
                if torch.version.cuda
                else f"torch {torch.__version__} is built without CUDA"
            )
            raise ConfigError(f"{key}: {name}: CUDA is not available here ({why}); use cpu or auto")
        # a bare "cuda" under torchrun means this process's LOCAL_RANK
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{key}: {name}: device {index}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: {name}: MPS is not available here; use cpu or auto")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"{key}: {name}: XPU is not available here; use cpu or auto")


def causal_lm_problem(config) -> str | None:
    """Why a transformers config is not a causal (decoder) language model, or None.

    ``AutoModelForCausalLM`` accepts encoders too: a BERT / MiniLM checkpoint becomes a
    ``BertLMHeadModel`` whose LM head is random, which then trains "successfully". A config is
    taken as causal when one of its ``architectures`` is a causal-LM class, or when it has none
    but its ``model_type`` has a causal-LM class and is not an encoder family (or says
    ``is_decoder: true``).
    """
    from transformers.models.auto import modeling_auto as auto

    CAUSAL, MASKED = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    causal_classes = set(CAUSAL.values())
    if any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return None
    if model_type not in CAUSAL:
        return f"model_type {model_type!r} has no causal language-model class in transformers"
    if getattr(config, "is_decoder", False):
        return None
    if archs:
        kind = "an encoder" if model_type in MASKED else "a model without a causal-LM head"
        return f"{kind} (model_type {model_type!r}, architectures {archs})"
    if model_type in MASKED:
        return f"an encoder (model_type {model_type!r}, is_decoder false)"
    return None


def model_config(path: str, key: str = "model.path"):
    """The transformers config of a model directory or hub id, or a one-line ConfigError naming
    ``key``: a path that is neither an existing directory nor a hub id (``name`` or ``org/name``)
    is reported as missing instead of transformers' "Repo id must be in the form ..."."""
    from transformers import AutoConfig

    try:
        check_model_source(path)  # no such directory / hub unreachable or without it: at once
    except ModelNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None
    try:
        path = resolve_pretrained(path)  # builtin:smollm2-135m-instruct / a .gguf: its converted directory
    except (ModelNotFoundError, ValueError) as e:  # gguf missing, a corrupt .gguf (naming the file)
        raise ConfigError(f"{key}: {e}") from None
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"{key}: {path}: no config.json, not a transformers model directory")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:  # not on the hub, hub unreachable, bad config.json, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = "cannot read the model's config" if local.is_dir() else "no such directory, nor from the hub"
        raise ConfigError(f"{key}: {path}: {what} ({first})") from None


def check_causal_lm(path: str, key: str = "model.path") -> None:
    """Refuse, from its config alone (before any weight is read), a model that is not a causal LM."""
    why = causal_lm_problem(model_config(path, key))
    if why is not None:
        raise ConfigError(
            f"{key}: {path}: not a causal (decoder-only) language model: {why}. loraforge trains "
            "causal LMs (Llama, Qwen2, Mistral, Gemma, GPT-2, ...); an encoder such as BERT or MiniLM "
            "would get a randomly initialised LM head"
        )


def load_base_model(cfg: ModelSection, device: torch.device, quantize: bool = False):
    """The base causal LM on ``device``; 4-bit when ``quantize`` (QLoRA), its compute dtype "auto"
    resolved to the model's."""
    dtype = resolve_dtype(cfg.dtype, device)
    qc: QuantConfig | None = cfg.quantization.resolved(dtype) if quantize else None
    path = cfg.path if builtin.is_builtin(cfg.path) else resolve_pretrained(cfg.path)
    if builtin.is_builtin(path):
        model = builtin.build_model(path, dtype)
        if qc is not None:
            model = quantize_4bit(model, qc)
    elif qc is not None and Path(path).is_dir():
        # Streams a local directory into 4-bit layer by layer (and reads saved 4-bit models).
        model = load_model(path, quantization=qc, dtype=dtype, device=device)
    else:
        from transformers import AutoModelForCausalLM

        check_model_source(path)
        kwargs = {"dtype": dtype}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if qc is not None:
            model = quantize_4bit(model, qc)
    name = base_name(cfg.path)
    if name is not None:  # the adapter's base_model_name_or_path: the original's hub id, not the cache
        model.config._name_or_path = name
    return model.to(device)


def prepare_model(cfg: TrainConfig, device: torch.device, log=print, dist=None):
    """(model, tokenizer) ready to train: LoRA injected (base frozen), or everything trainable.
    Under FSDP (``dist.fsdp``) each decoder layer is loaded and sharded in turn (``sharded_load``):
    no process holds the whole model; the caller shards the root (``fsdp.shard_model``)."""
    if not builtin.is_builtin(cfg.model.path):
        check_causal_lm(cfg.model.path)  # from config.json, before the tokenizer and the weights
    elif cfg.model.path[len(builtin.PREFIX) :] not in builtin.MODELS:
        raise ConfigError(f"model.path: {unknown_builtin(cfg.model.path)}")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    sharded = dist is not None and dist.fsdp
    if sharded:  # (the adapter is injected there, before the layers are loaded and sharded)
        from .sharded_load import load_sharded

        model = load_sharded(cfg, dist, log)
    else:
        model = load_base_model(cfg.model, device, quantize=cfg.method == "qlora")
    model.config.use_cache = False
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif not sharded:
        inject(model, adapter_config(cfg))
        model.to(device)  # the new adapter tensors
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model, tokenizer


def adapter_config(cfg: TrainConfig):
    """The adapter config ``method`` trains: the lora section (lora, qlora), with DoRA for dora,
    else the method's own section (``config.ADAPTER_SECTIONS``)."""
    if cfg.method == "dora":
        return dataclasses.replace(cfg.lora, use_dora=True)
    section = getattr(cfg, ADAPTER_SECTIONS[cfg.method])
    if getattr(section, "tokenizer", None):  # a prompt's text init: the tokenizer as a directory
        section = dataclasses.replace(section, tokenizer=tokenizer_dir(section.tokenizer, Path(cfg.output)))
    return section


def tokenizer_dir(path: str, output: Path) -> str:
    """A directory ``AutoTokenizer`` loads for ``path``: a built-in model's tokenizer is written to
    ``output/builtin-tokenizer`` first; builtin:smollm2 and .gguf files resolve to their cache."""
    if builtin.is_builtin(path):
        target = output / "builtin-tokenizer"
        builtin.build_tokenizer().save_pretrained(target)
        return str(target)
    return str(resolve_pretrained(path))


def enable_activation_checkpointing(model) -> None:
    """transformers' per-layer activation checkpointing, non-reentrant (which works with a frozen
    embedding layer and with DDP): each decoder layer keeps only its input for backward and runs
    its forward again there."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def save_trained(model, tokenizer, directory: Path, method: str, state_dict=None) -> None:
    """User-facing result: a PEFT adapter directory (lora/qlora) or a full model directory
    (``state_dict``: the weights to write instead of the model's own, e.g. gathered from FSDP
    shards)."""
    directory = Path(directory)
    if method == "full":
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    else:
        save_adapter(model, directory)
    tokenizer.save_pretrained(directory)


@torch.no_grad()
def check_packed_attention(model) -> None:
    """Refuse packing for a model whose attention would cross packed examples.

    Packing relies on the model building a block-diagonal mask from position ids that restart at
    each example (transformers does for Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2, ...). Check it
    on two short random sequences: the second one's hidden states must not change when the first
    is packed in front of it.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(device) for n in (5, 6))
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None].to(device)
    body = model.base_model
    packed = body(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False)[0][0, 5:]
    alone = body(input_ids=b, position_ids=positions[:, 5:], use_cache=False)[0][0]
    model.train(was_training)
    error = ((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-6)).item()
    if error > 1e-2:
        raise ValueError(
            f"{type(model).__name__} lets packed examples attend to each other (position ids do not "
            f"separate them; relative change {error:.2g}); set data.packing: false"
        )
