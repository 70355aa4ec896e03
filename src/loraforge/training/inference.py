"""After training: load a base with adapters, generate, merge to a plain model.

These are the library side of ``loraforge generate | merge`` (``inspect`` is in ``inspection``).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from ..adapter_files import load_adapter
from ..adapters import merge_and_unload
from ..pretrained import base_name
from ..pretrained import resolve as resolve_pretrained
from . import builtin
from .data import encode_prompt
from .dist import pick_device
from .modeling import DTYPES, check_causal_lm, load_tokenizer, resolve_dtype

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def load_with_adapters(
    base: str,
    adapters: dict[str, str] | None = None,
    dtype: str = "float32",
    device: str = "auto",
    need_tokenizer: bool = True,
):
    """(model, tokenizer): the base model (a directory, hub id or ``builtin:NAME``) with each
    ``name -> adapter directory`` loaded. The tokenizer comes from the first adapter directory
    that holds one (it carries the chat template used in training), else from the base; without
    ``need_tokenizer``, it is ``None`` where that is a directory without tokenizer files."""
    adapters = adapters or {}
    dev = pick_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if builtin.is_builtin(base):
        model = builtin.build_model(base, torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        check_causal_lm(base, key="--base")  # also: no such directory / hub unreachable, at once
        model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(base), dtype=torch_dtype)
        if base_name(base) is not None:  # what a merged model's config records: not the cache dir
            model.config._name_or_path = base_name(base)
    for name, directory in adapters.items():
        if not (Path(directory) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{directory}: not an adapter directory (no adapter_config.json)")
        load_adapter(model, directory, adapter=name)
    tok_source = next((d for d in adapters.values() if _has_tokenizer(d)), base)
    local = not builtin.is_builtin(tok_source) and Path(tok_source).is_dir()
    if not need_tokenizer and local and not _has_tokenizer(tok_source):
        tokenizer = None
    else:
        tokenizer = load_tokenizer(tok_source)
    model.to(dev).eval()
    return model, tokenizer


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids for a prompt: a user turn in the chat template when the tokenizer has one (and
    ``chat``), else the raw text as training's prompt/completion format starts it."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode_prompt(tokenizer, prompt)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
) -> str:
    """The model's continuation of ``prompt`` (greedy when temperature is 0)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)], device=device)
    stop = [tokenizer.eos_token_id]
    if chat and getattr(tokenizer, "chat_template", None):
        from ..chat_templates import turn_end_id

        # the template's end-of-turn token too (llama3's <|eot_id|> is not a Llama 3 base's EOS)
        stop += [i for i in [turn_end_id(tokenizer)] if i is not None and i not in stop]
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def merge_to_dir(base: str, adapter: str, out: str | Path, dtype: str = "float32") -> Path:
    """Merge ``adapter`` into ``base`` and save a plain transformers model directory (safetensors,
    config, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads. Written to a temporary
    directory first and renamed into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    model, tokenizer = load_with_adapters(base, {"default": adapter}, dtype, "cpu", need_tokenizer=False)
    plain = merge_and_unload(model)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    else:  # a base without tokenizer files (and an adapter without them): the model alone
        warnings.warn(
            f"{base} and {adapter} hold no tokenizer files: {out} has the merged model without a "
            "tokenizer (copy one there to use it)",
            stacklevel=2,
        )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


__all__ = ["DTYPES", "generate", "load_with_adapters", "merge_to_dir", "prompt_ids"]
