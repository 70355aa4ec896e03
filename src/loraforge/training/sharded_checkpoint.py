"""Checkpoints of an FSDP run: every process writes its own shards (PyTorch's distributed
checkpoint, DCP, in safetensors), nobody gathers the model.

Layout of ``OUTPUT/checkpoints/step-000050/`` (``checkpoint.py`` has the single-process one)::

    adapter/                the adapter in PEFT format (lora / qlora / dora), gathered: load it anywhere
    sharded/                DCP: shard-0000R-model-00001-of-00001.safetensors per process: the
                            trainable tensors (``model.<name>``) and their optimizer state
                            (``optim.<name>.<key>``), each tensor's slice with its offsets (JSON in
                            the safetensors header)
    optimizer.json          the optimizer's param_groups (hyper-parameters)
    scheduler.json          learning-rate scheduler state_dict
    rng-rank0000R.{json,safetensors}  each process's random states
    state.json              step, data position, world size, config; written last

DCP's reader reassembles each tensor from whichever shards hold its pieces, so a checkpoint
loads on any number of processes. Written under ``.tmp-step-*`` and renamed into place by the
main process once every process has written its part (a barrier), so it is complete or absent.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as td

from . import checkpoint as ckpt


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / "sharded").is_dir()


def _flat_state(model, optimizer) -> dict:
    """``{"model.<name>": tensor, "optim.<name>.<key>": tensor}`` over the trainable parameters
    (sharded DTensors under FSDP), named by parameter name: the same keys on any number of
    processes. DCP saves them and loads into them in place."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    flat = {f"model.{names[id(p)]}": p for group in optimizer.param_groups for p in group["params"]}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                flat[f"optim.{names[id(p)]}.{key}"] = value
    return flat


@torch.no_grad()
def _init_optimizer_state(optimizer) -> None:
    """Give every parameter its optimizer state (zeros) without changing it, so that a checkpoint
    can be loaded into that state in place: one step with zero gradients at learning rate 0."""
    if all(p in optimizer.state for g in optimizer.param_groups for p in g["params"]):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _groups(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def save(output, step: int, model, optimizer, scheduler, state: dict, dist, save_adapter, keep: int) -> Path:
    """Write ``checkpoints/step-{step:06d}`` from every process (a collective); returns its path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    root = ckpt.checkpoint_root(output)
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    td.barrier()
    _init_optimizer_state(optimizer)  # (a checkpoint before any step: every tensor saved)
    flat, groups = _flat_state(model, optimizer), _groups(optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / "sharded"), save_distributed=True))
    ckpt.save_state(ckpt.rng_state(), tmp, f"rng-rank{dist.rank:05d}")
    if save_adapter is not None:
        save_adapter(tmp / "adapter")  # gathers the adapter on every process, the main one writes
    td.barrier()
    if dist.is_main:
        (tmp / "optimizer.json").write_text(json.dumps(groups))
        ckpt.save_state(scheduler.state_dict(), tmp, "scheduler")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "time": time.time()}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for stale in ckpt.list_checkpoints(output)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    td.barrier()
    return final


def load(directory: Path, model, optimizer, scheduler, dist) -> dict:
    """Restore the trainable tensors, optimizer and scheduler (and this process's RNG) from a
    sharded checkpoint, on any number of processes; returns state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    _init_optimizer_state(optimizer)
    with torch.no_grad():
        reader = HuggingFaceStorageReader(str(directory / "sharded"))
        dcp.load(_flat_state(model, optimizer), storage_reader=reader)
    saved = json.loads((directory / "optimizer.json").read_text())
    for group, values in zip(optimizer.param_groups, saved):
        group.update(values)
    scheduler.load_state_dict(ckpt.load_state(directory, "scheduler"))
    rng = directory / f"rng-rank{dist.rank:05d}.json"
    if rng.exists():
        ckpt.set_rng_state(ckpt.load_state(directory, rng.stem))
    return state
