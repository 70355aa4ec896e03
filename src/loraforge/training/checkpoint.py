"""Checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``OUTPUT/checkpoints/step-000050/``::

    adapter/                  the adapter(s) in PEFT format (lora / qlora): load it anywhere
    trainable.safetensors     every trainable tensor by parameter name (exact resume, any method)
    optimizer.safetensors     optimizer state tensors ...
    optimizer.json            ... and the rest of its state_dict (hyper-parameters, step counts)
    scheduler.json            learning-rate scheduler state_dict
    rng.safetensors, rng.json torch (CPU and CUDA), Python and NumPy random states
    state.json                step, epoch, data position, loss, config; written last

The directory is assembled under a temporary name and renamed into place, so a checkpoint
either exists completely or not at all: a run killed mid-save leaves only a ``.tmp-*``
directory, which resume ignores. A save that fails (a full disk) removes its ``.tmp-*`` at once;
pruning renames an old checkpoint to ``.old-*`` before deleting it, so a kill mid-delete never
leaves a ``step-*`` folder without ``state.json``; ``clean_partial`` (at the start of every run)
removes what a killed run left of either. Tensors are stored as safetensors and everything else
as JSON (no pickle), so loading a checkpoint never executes code. Non-finite trainable tensors
are never saved.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .lock import RunError

STEP_DIR = re.compile(r"^step-(\d+)$")


# -- nested state <-> (tensors, JSON) ----------------------------------------------------------


def flatten_state(obj, tensors: dict[str, torch.Tensor], prefix: str = "s"):
    """JSON-able copy of ``obj`` with each tensor moved into ``tensors`` under a unique key."""
    if torch.is_tensor(obj):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, flatten_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix})")


def unflatten_state(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in obj["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    return obj


def save_state(obj, directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten_state(obj, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(meta))


def load_state(directory: Path, name: str):
    meta = json.loads((directory / f"{name}.json").read_text())
    st = directory / f"{name}.safetensors"
    return unflatten_state(meta, load_file(str(st)) if st.exists() else {})


# -- random number generators -------------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# -- checkpoints ---------------------------------------------------------------------------------------


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoints (those with ``state.json``), oldest first."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def save_checkpoint(
    output: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    save_adapter=None,
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step-{step:06d}`` atomically and prune to the newest ``keep``.

    save_adapter: optional ``fn(directory)`` writing the user-facing adapter files. Raises
    RunError (nothing written) when a trainable tensor holds NaN/Inf; on any failure the
    temporary directory is removed and the earlier checkpoints are untouched.
    """
    trainable = {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    bad = [n for n, v in trainable.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RunError(
            f"step {step}: trainable tensor {bad[0]} holds NaN/Inf ({len(bad)} tensors); "
            f"not saved, so the newest checkpoint in {checkpoint_root(output)} stays the last good one"
        )
    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if save_adapter is not None:
            save_adapter(tmp / "adapter")
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_state(optimizer.state_dict(), tmp, "optimizer")
        save_state(scheduler.state_dict(), tmp, "scheduler")
        save_state(rng_state(), tmp, "rng")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "time": time.time()}, indent=2))
        _fsync_dir(tmp)
        rename_into_place(tmp, final)
    except BaseException:  # a full disk, a second Ctrl-C: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    for stale in prunable(output, keep):
        _remove(stale)
    return final


def prunable(output: str | Path, keep: int) -> list[Path]:
    """The checkpoints beyond the newest ``keep``, except the best one (early stopping marks it in
    ``checkpoints/best.json``): those pruning removes."""
    best = best_checkpoint(output)
    return [d for d in list_checkpoints(output)[:-keep] if d != best]


def best_checkpoint(output: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/best.json`` names (early stopping's best eval loss), if any."""
    marker = checkpoint_root(output) / "best.json"
    try:
        return checkpoint_root(output) / json.loads(marker.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_best(output: str | Path, checkpoint: Path, step: int, eval_loss: float) -> None:
    """Name ``checkpoint`` the best one (exempt from pruning), atomically."""
    root = checkpoint_root(output)
    tmp = root / f".best.json.tmp-{os.getpid()}"
    record = {"checkpoint": Path(checkpoint).name, "step": step, "eval_loss": eval_loss}
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(root / "best.json")


def rename_into_place(tmp: Path, final: Path) -> None:
    """``tmp`` -> ``final``; an existing ``final`` (the same step saved again) is swapped out
    through ``.old-*`` and deleted after, so ``final`` is always either the old or the new one."""
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove(directory: Path) -> None:
    """Delete a checkpoint: renamed first, so a kill mid-delete leaves a ``.old-*`` name that
    ``clean_partial`` removes, never a ``step-*`` folder that lost its ``state.json``."""
    trash = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    try:
        directory.rename(trash)
    except OSError:
        trash = directory
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's files and entries so a rename after it is durable across a crash."""
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        if p.is_file() or p == path:
            try:
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass


def load_checkpoint(directory: str | Path, model, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG from ``directory``; returns state.json."""
    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    tensors = load_file(str(directory / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(
            f"{directory}: checkpoint does not match this model's trainable parameters "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}); was it made with another config?"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(
                    f"{directory}: {name} has shape {tuple(tensors[name].shape)}, model has {tuple(p.shape)}"
                )
            p.copy_(tensors[name])
    optimizer.load_state_dict(load_state(directory, "optimizer"))
    scheduler.load_state_dict(load_state(directory, "scheduler"))
    set_rng_state(load_state(directory, "rng"))
    return state


def clean_partial(output: str | Path) -> list[str]:
    """Remove what a run that died while saving or pruning left behind: ``.tmp-*`` / ``.old-*``
    directories, and ``step-*`` folders without ``state.json`` (never complete: a complete one is
    renamed into place with its ``state.json``). Only call it while holding the output's lock.
    Returns the names removed."""
    root = checkpoint_root(output)
    removed = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            partial = d.name.startswith((".tmp-", ".old-"))
            if partial or (STEP_DIR.match(d.name) and d.is_dir() and not (d / "state.json").is_file()):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed
