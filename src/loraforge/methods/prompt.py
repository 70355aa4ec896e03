"""Prompt learning: prefix tuning, prompt tuning and P-tuning on decoder-only causal LMs.

The configs are ``prompt_config``'s (:class:`PrefixTuningConfig`, :class:`PromptTuningConfig`,
:class:`PromptEncoderConfig`: PEFT's classes and ``peft_type`` values PREFIX_TUNING,
PROMPT_TUNING, P_TUNING); the modules and the forward hooks are ``prompt_layers``'. This module is
the method interface of ``loraforge.methods``:

- the model keeps its class: ``model.prompt_encoder`` holds the adapters' encoders, and hooks on
  the model and its body put the active adapter's virtual tokens in (see ``prompt_layers``);
- a file holds ``prompt_embeddings`` only, the table after any reparameterisation (PEFT's
  format): prefix tuning num_virtual_tokens × 2·layers·kv_width, prompt / P-tuning
  num_virtual_tokens × hidden. An adapter loaded from a file holds that table (``inference_mode``),
  as PEFT's loaded adapter does; it can train further, the table itself.

Context: each method takes ``num_virtual_tokens`` positions of the context window (the real
tokens start at that position); prefix tuning adds that many keys and values per layer to
attention, prompt / P-tuning that many extra positions to every layer's compute.

``PeftModel``'s differences that remain: PEFT drops ``position_ids`` for prompt / P-tuning with a
warning, where loraforge moves them on by num_virtual_tokens (the same result when they are the
default 0, 1, ...; left-padded batches keep each row's own positions). PEFT 0.21.2's ``generate``
with transformers >= 5.2x reads the cache under its old name (``past_key_values``), so it drops
prefix tuning's prefix and re-inserts prompt tuning's virtual tokens at every step;
loraforge's ``model.generate`` equals a greedy loop over PEFT's forward instead.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .prompt_config import CONFIGS, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .prompt_layers import PrefixEncoder, PromptEmbedding, PromptLearningLayer, PTuningEncoder

HOLDER = "prompt_encoder"  # the model attribute holding the encoders (PEFT's name)
FILE_KEY = "prompt_embeddings"


def _check_model(model: nn.Module) -> None:
    """A decoder-only causal LM of transformers, with a body (``model.base_model``) taking
    ``inputs_embeds`` and a cache; ValueError saying what the model is otherwise."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder (seq2seq) model; loraforge's prefix / prompt tuning supports "
            "decoder-only causal LMs (e.g. LlamaForCausalLM, GPT2LMHeadModel)"
        )
    can_generate = getattr(model, "can_generate", None)
    body = getattr(model, "base_model", model)
    if config is None or body is model or not (callable(can_generate) and can_generate()):
        raise ValueError(
            f"{name} is not a decoder-only causal LM (a transformers model with a body and an LM head that "
            "can generate); loraforge's prefix / prompt tuning supports those only (e.g. LlamaForCausalLM)"
        )
    params = inspect.signature(body.forward).parameters
    if "inputs_embeds" not in params or not ({"cache", "past_key_values"} & set(params)):
        raise ValueError(
            f"{type(body).__name__}.forward takes no inputs_embeds and cache: prompt learning needs both"
        )
    existing = getattr(model, HOLDER, None)
    if existing is not None and not isinstance(existing, PromptLearningLayer):
        raise ValueError(f"{name} already has an attribute {HOLDER!r} ({type(existing).__name__})")


def find_targets(model: nn.Module, cfg) -> list[str]:
    """``["prompt_encoder"]`` after checking that ``cfg`` fits ``model`` (nothing changes)."""
    _check_model(model)
    resolved = cfg.resolved(model.config)
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and resolved.num_virtual_tokens >= limit:
        raise ValueError(
            f"{type(cfg).__name__}.num_virtual_tokens={resolved.num_virtual_tokens} leaves no room in the "
            f"model's context window (max_position_embeddings={limit})"
        )
    if isinstance(resolved, PrefixTuningConfig) and getattr(model, "is_gradient_checkpointing", False):
        raise ValueError(
            "prefix tuning does not work with gradient checkpointing; turn it off first (as in PEFT)"
        )
    if isinstance(resolved, PromptTuningConfig) and resolved.init == "text" and not resolved.inference_mode:
        _text_ids(model, resolved)  # (a tokenizer that does not load fails here, before any change)
    return [HOLDER]


def _text_ids(model: nn.Module, cfg: PromptTuningConfig) -> list[int]:
    """The token ids of ``init_text`` repeated or cut to num_virtual_tokens (PEFT's rule)."""
    from transformers import AutoTokenizer

    kwargs = dict(cfg.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # (a tokenizer must never run code from the adapter's config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, **kwargs)
    except Exception as e:  # (OSError, ValueError, ... : the library's one-line reason)
        raise ValueError(f"PromptTuningConfig.tokenizer {cfg.tokenizer!r} could not be loaded: {e}") from e
    ids = list(tokenizer(cfg.init_text)["input_ids"])
    if not ids:
        raise ValueError(f"PromptTuningConfig.init_text {cfg.init_text!r} tokenizes to no token")
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= vocab:
        raise ValueError(
            f"PromptTuningConfig.tokenizer gives token id {max(ids)}, past the model's vocabulary ({vocab})"
        )
    n = cfg.num_virtual_tokens
    return (ids * math.ceil(n / len(ids)))[:n]


def _encoder(model: nn.Module, cfg) -> nn.Module:
    if isinstance(cfg, PrefixTuningConfig):
        return PrefixEncoder(cfg)
    if isinstance(cfg, PromptEncoderConfig):
        return PTuningEncoder(cfg)
    init = None
    if cfg.init != "random" and not cfg.inference_mode:
        embed = model.get_input_embeddings()
        device = embed.weight.device
        if cfg.init == "text":
            ids = torch.tensor(_text_ids(model, cfg), device=device)
        else:  # sample_vocab
            ids = torch.randint(0, embed.weight.shape[0], (cfg.num_virtual_tokens,), device=device)
        with torch.no_grad():
            init = embed(ids).float()
    return PromptEmbedding(cfg, init)


def inject(model: nn.Module, cfg, adapter: str, targets: list[str]):
    """Add ``adapter``'s encoder to ``model.prompt_encoder`` (created and hooked on first use).
    Returns the config resolved for this model (dimensions filled as PEFT writes them), which the
    registry keeps; the caller's config is not changed."""
    resolved = cfg.resolved(model.config)
    device = model.get_input_embeddings().weight.device
    encoder = _encoder(model, resolved).to(device).train(model.training)
    holder = getattr(model, HOLDER, None)
    if holder is None:
        holder = PromptLearningLayer().train(model.training)
        model.add_module(HOLDER, holder)
        holder.attach(model)
    holder.add(adapter, resolved, encoder)
    return resolved


def expected_shapes(model: nn.Module, cfg, targets: list[str]) -> dict[str, tuple]:
    return {FILE_KEY: cfg.resolved(model.config).table_shape()}


def live_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """``prompt_embeddings``: the live table, or for a reparameterised adapter the encoder's output
    (derived: saving computes it; loading gives an adapter that holds it, see ``inference_mode``)."""
    return {FILE_KEY: getattr(model, HOLDER).file_table(adapter)}


__all__ = [
    "CONFIGS",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "expected_shapes",
    "find_targets",
    "inject",
    "live_tensors",
]
