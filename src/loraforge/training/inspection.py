"""``loraforge inspect``: what an adapter, checkpoint, run or model directory holds, read from its
files alone (configs and safetensors headers; no model is loaded, no pickle is opened)."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import dir_size, format_bytes, read_json_object


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


__all__ = ["format_info", "inspect_path"]
