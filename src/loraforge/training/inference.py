"""After training: load a base with adapters, generate, merge to a plain model, inspect files.

These are the library side of ``loraforge generate | merge | inspect``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..adapters import merge_and_unload
from ..files import dir_size, format_bytes, read_json_object
from ..io import load_adapter
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
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
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
        eos_token_id=tokenizer.eos_token_id,
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


# -- inspect -----------------------------------------------------------------------------------------


def _safetensors_summary(files: list[Path]) -> dict:
    """Tensor count, parameter count and dtypes of safetensors files, read from their headers
    (a truncated or corrupt file is a ValueError naming it)."""
    from safetensors import SafetensorError, safe_open

    n, dtypes, keys = 0, set(), 0
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    s = st.get_slice(key)
                    count = 1
                    for d in s.get_shape():
                        count *= d
                    n += count
                    dtypes.add(s.get_dtype())
                    keys += 1
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return {"tensors": keys, "params": n, "dtypes": sorted(dtypes)}


def _weights(directory: Path, stem: str) -> list[Path]:
    """The safetensors files of an adapter (``stem`` adapter_model) or model (``model``)
    directory; none, or only pickles (``*.bin``, never read here), is a ValueError."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    if pickles:
        raise ValueError(
            f"{directory}: its weights are pickles ({', '.join(pickles)}), which loraforge never loads; "
            f"convert them to {stem}.safetensors"
        )
    raise ValueError(f"{directory}: no weights ({stem}.safetensors is missing)")


def _training_method(run_dir: Path) -> str | None:
    """lora / qlora, when the adapter sits in a loraforge output or checkpoint directory."""
    import yaml

    try:
        if (run_dir / "state.json").is_file():
            return read_json_object(run_dir / "state.json").get("method")
        if (run_dir / "config.yaml").is_file():
            return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("method")
    except (OSError, ValueError, yaml.YAMLError):
        pass
    return None


def inspect_path(path: str | Path) -> dict:
    """What a directory holds: a PEFT adapter, a training checkpoint, a training output, or a
    transformers model."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    info: dict = {"path": str(path), "size_bytes": dir_size(path)}
    if (path / "adapter_config.json").is_file():
        cfg = read_json_object(path / "adapter_config.json")
        targets = cfg.get("target_modules")
        info.update(
            kind="adapter",
            format="PEFT LoRA" if cfg.get("peft_type") == "LORA" else f"PEFT {cfg.get('peft_type')}",
            method=_training_method(path.parent),
            base_model=cfg.get("base_model_name_or_path"),
            r=cfg.get("r"),
            alpha=cfg.get("lora_alpha"),
            dropout=cfg.get("lora_dropout"),
            use_rslora=cfg.get("use_rslora"),
            target_modules=targets,
            modules_to_save=cfg.get("modules_to_save"),
            **_safetensors_summary(_weights(path, "adapter_model")),
        )
        return info
    if (path / "state.json").is_file():
        state = read_json_object(path / "state.json")
        info.update(
            kind="checkpoint",
            method=state.get("method"),
            step=state.get("step"),
            epoch=state.get("epoch"),
            step_in_epoch=state.get("step_in_epoch"),
            rows_seen=state.get("rows_seen"),
            loss=state.get("loss"),
            world_size=state.get("world_size"),
            base_model=(state.get("config") or {}).get("model", {}).get("path"),
            trainable=_safetensors_summary([path / "trainable.safetensors"]),
            optimizer_bytes=sum(p.stat().st_size for p in path.glob("optimizer.*")),
        )
        if (path / "adapter").is_dir():
            info["adapter"] = inspect_path(path / "adapter")
        return info
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        from .checkpoint import list_checkpoints

        records = []
        if (path / "metrics.jsonl").is_file():
            for line in (path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # e.g. the last line of a killed run: not needed here
                    continue
                if isinstance(record, dict):
                    records.append(record)
        end = next((r for r in reversed(records) if r.get("event") == "end"), {})
        info.update(
            kind="training output",
            checkpoints=[p.name for p in list_checkpoints(path)],
            finished=bool(end),
            steps=end.get("steps"),
            initial_eval_loss=end.get("initial_eval_loss"),
            final_eval_loss=end.get("final_eval_loss"),
            tokens_per_s=end.get("tokens_per_s"),
        )
        for sub in ("adapter", "model"):
            if (path / sub).is_dir():
                info[sub] = inspect_path(path / sub)
        return info
    if (path / "config.json").is_file():
        cfg = read_json_object(path / "config.json")
        info.update(
            kind="model",
            architectures=cfg.get("architectures"),
            model_type=cfg.get("model_type"),
            dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            quantization=cfg.get("quantization_config"),
            **_safetensors_summary(_weights(path, "model")),
        )
        return info
    raise ValueError(f"{path}: not an adapter, checkpoint, training output or model directory")


def format_info(info: dict, indent: str = "") -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict) and key in ("adapter", "model", "trainable"):
            lines.append(f"{indent}{key}:")
            lines.append(format_info(value, indent + "  "))
        elif key == "target_modules" and isinstance(value, list) and len(value) > 6:
            kinds = sorted({v.rsplit(".", 1)[-1] for v in value})
            lines.append(f"{indent}{'target modules':<18} {len(value)} modules: {', '.join(kinds)}")
        elif key == "size_bytes":
            lines.append(f"{indent}{'size on disk':<18} {format_bytes(value)}")
        elif key in ("params",) and isinstance(value, int):
            lines.append(f"{indent}{key:<18} {value:,}")
        elif value is not None:
            lines.append(f"{indent}{key.replace('_', ' '):<18} {value}")
    return "\n".join(lines)


__all__ = ["DTYPES", "generate", "inspect_path", "load_with_adapters", "merge_to_dir", "prompt_ids"]
