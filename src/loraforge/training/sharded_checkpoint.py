"""Checkpoints of an FSDP run: every process writes its own shards (PyTorch's distributed
checkpoint, DCP, in safetensors), nobody gathers the model.

Layout of ``OUTPUT/checkpoints/step-000050/`` (``checkpoint.py`` has the single-process one)::

    adapter/                the adapter in PEFT format (lora / qlora / dora), gathered: load it anywhere
    sharded/                DCP: shard-0000R-model-00001-of-00001.safetensors per process: the
                            trainable tensors (``model.<name>``) and the optimizer state that exists
                            (``optim.<name>.<key>``), each tensor's slice with its offsets (JSON in
                            the safetensors header)
    optimizer.json          the optimizer's param_groups (hyper-parameters)
    scheduler.json          learning-rate scheduler state_dict
    rng-rank0000R.{json,safetensors}  each process's random states
    state.json              step, data position, world size, config; written last

DCP's reader reassembles each tensor from whichever shards hold its pieces, so a checkpoint
loads on any number of processes, and also without FSDP (DDP or one process). A process whose
rank the checkpoint lacks (more processes than when saved) takes the random state of rank
``rank mod saved world size``. A single-process / DDP checkpoint (``trainable.safetensors``) also
loads under FSDP: each process keeps its slice of every tensor.

Atomicity across processes (the output directory may be shared by several nodes, e.g. NFS):

    1. the main process creates ``.tmp-step-*``
    2. every process writes its shards, its random state (the main one the adapter), fsyncs them
    3. the main process alone writes the JSON files, ``state.json`` last, fsyncs, renames the
       directory into place (an older one of the same step swapped out via ``.old-*``), fsyncs
       the parent, and prunes with ``checkpoint._remove`` (rename first)

Each phase ends with a vote (an all-reduce of failures, also the barrier): if any process failed,
the main one deletes the ``.tmp`` and every process raises, none is left waiting. A kill -9 of
any process at any moment leaves the earlier checkpoints intact plus a ``.tmp-*`` / ``.old-*``
that ``checkpoint.clean_partial`` removes, or the new checkpoint complete (a same-step swap cut
between its two renames loses that step's older copy only). Under FSDP a run refuses to save
NaN/Inf trainable tensors, as checkpoint.py does, and saves the optimizer state that exists: a
step skipped before the first optimizer step leaves Adam without state, and inventing zeros
would count a step Adam never took.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as td
from torch.distributed.checkpoint.api import CheckpointException

from . import checkpoint as ckpt
from .dist import all_reduce_sum
from .lock import RunError


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / "sharded").is_dir()


def _trainable_names(model) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


def _flat_state(model, optimizer) -> dict:
    """``{"model.<name>": tensor, "optim.<name>.<key>": tensor}`` over the trainable parameters
    (sharded DTensors under FSDP) and the optimizer state that exists, named by parameter name:
    the same keys on any number of processes. DCP saves them and loads into them in place."""
    names = _trainable_names(model)
    flat = {f"model.{names[id(p)]}": p for group in optimizer.param_groups for p in group["params"]}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                flat[f"optim.{names[id(p)]}.{key}"] = value
    return flat


@torch.no_grad()
def _init_optimizer_state(optimizer) -> None:
    """Give every parameter its optimizer state (zeros) without changing it, so that a checkpoint
    can be loaded into that state in place: one step with zero gradients at learning rate 0.
    Only for loading (the state is then overwritten or dropped), never before a save: it would
    count a step Adam never took."""
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


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (``checkpoint._fsync_dir`` for a tree)."""
    for d, _, _ in os.walk(path):
        ckpt._fsync_dir(Path(d))


def _vote(dist, failed: bool) -> int:
    """How many processes failed (an all-reduce; also the barrier between the phases)."""
    return int(all_reduce_sum(dist, float(failed))[0])


def _check_finite(model, step: int, output, dist) -> None:
    """RunError on every process (nothing written) when a trainable tensor holds NaN/Inf on any."""
    from .fsdp import local_tensor

    bad = [n for n, p in model.named_parameters() if p.requires_grad and not local_tensor(p).isfinite().all()]
    if _vote(dist, bool(bad)):
        raise RunError(
            f"step {step}: trainable tensor {bad[0] if bad else '(on another process)'} holds NaN/Inf; "
            f"not saved, so the newest checkpoint in {ckpt.checkpoint_root(output)} stays the last good one"
        )


def save(output, step: int, model, optimizer, scheduler, state: dict, dist, save_adapter, keep: int) -> Path:
    """Write ``checkpoints/step-{step:06d}`` from every process (a collective); returns its path.
    Saves the optimizer state that exists (none before the first optimizer step)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    _check_finite(model, step, output, dist)
    root = ckpt.checkpoint_root(output)
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    error = None
    try:
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    except Exception as e:
        error = e
    _finish_phase(dist, error, tmp, step)  # (the barrier: the directory exists before anyone writes)
    try:  # every process its part (dcp.save raises on every process when one fails)
        (tmp / "sharded").mkdir(parents=True, exist_ok=True)  # (another node may not see it yet)
        flat = _flat_state(model, optimizer)
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / "sharded"), save_distributed=True))
        ckpt.save_state(ckpt.rng_state(), tmp, f"rng-rank{dist.rank:05d}")
        if save_adapter is not None:
            save_adapter(tmp / "adapter")  # gathers the adapter on every process, the main one writes
        _fsync_tree(tmp)  # on the server before the main process renames (NFS: close-to-open)
    except (Exception, CheckpointException) as e:
        error = e
    _finish_phase(dist, error, tmp, step)
    try:  # the main process alone: JSON, state.json last, rename, prune
        if dist.is_main:
            ckpt.save_state(_groups(optimizer), tmp, "optimizer")  # (JSON; tuples kept)
            ckpt.save_state(scheduler.state_dict(), tmp, "scheduler")
            state = {**state, "step": step, "time": time.time()}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            ckpt._fsync_dir(tmp)
            ckpt.rename_into_place(tmp, final)
            ckpt._fsync_dir(root)
            for stale in ckpt.prunable(output, keep):  # (never the best)
                ckpt._remove(stale)
    except Exception as e:
        error = e
    _finish_phase(dist, error, tmp, step)
    return final


def _finish_phase(dist, error: Exception | None, tmp: Path, step: int) -> None:
    """After a phase of ``save``: if any process failed, the ``.tmp`` goes and every process raises."""
    failed = _vote(dist, error is not None)
    if not failed:
        return
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, CheckpointException):  # (a BaseException, with every process's traceback)
        raise RunError(f"step {step}: writing the sharded checkpoint failed: {_first(error)}") from None
    if error is not None:
        raise error
    raise RunError(f"step {step}: saving the checkpoint failed on {failed} other process(es); nothing saved")


def _first(e: CheckpointException) -> str:
    """One line for DCP's exception: the first failing process's error."""
    rank, (exc, _) = next(iter(e.failures.items()))
    return f"process {rank}: {type(exc).__name__}: {exc}"


# -- loading ----------------------------------------------------------------------------------------


def load(directory: Path, model, optimizer, scheduler, dist) -> dict:
    """Restore the trainable tensors, optimizer and scheduler (and this process's RNG) from a
    sharded checkpoint, on any number of processes, with or without FSDP; or from a
    single-process / DDP checkpoint under FSDP. Returns state.json."""
    directory = Path(directory)
    state = json.loads((directory / "state.json").read_text())
    if not is_sharded_checkpoint(directory):
        _load_unsharded(directory, model, optimizer, scheduler)
        ckpt.set_rng_state(ckpt.load_state(directory, "rng"))
        return state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(directory / "sharded"))
    metadata = reader.read_metadata().state_dict_metadata
    names = _trainable_names(model)
    wanted = {f"model.{n}" for n in names.values()}
    if not wanted <= set(metadata):
        _mismatch(directory, wanted, {k for k in metadata if k.startswith("model.")})
    _init_optimizer_state(optimizer)  # targets to load into; state the checkpoint lacks goes below
    flat = {k: v for k, v in _flat_state(model, optimizer).items() if k in metadata}
    _check_complete(directory, metadata, flat)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process, no group: meant
            dcp.load(flat, storage_reader=reader, no_dist=not td.is_initialized())
    except CheckpointException as e:  # (a BaseException, with every process's traceback)
        raise ValueError(f"{directory}: reading the sharded checkpoint failed: {_first(e)}") from None
    for p in list(optimizer.state):
        if not any(k.startswith(f"optim.{names[id(p)]}.") for k in flat):
            del optimizer.state[p]  # no optimizer step had reached it when saved
    for group, values in zip(optimizer.param_groups, ckpt.load_state(directory, "optimizer")):
        group.update(values)
    scheduler.load_state_dict(ckpt.load_state(directory, "scheduler"))
    was = int(state.get("world_size", 1))
    ckpt.set_rng_state(ckpt.load_state(directory, f"rng-rank{dist.rank % was:05d}"))
    return state


def _check_complete(directory: Path, metadata: dict, flat: dict) -> None:
    """Each tensor to load has its shape in the shards present and is covered whole by them
    (DCP's reader takes the shape from the pieces it finds, and would leave a missing one as is)."""
    for key, target in flat.items():
        md = metadata[key]
        have = sum(math.prod(c.sizes) for c in md.chunks)
        if tuple(md.size) != tuple(target.shape) or have != math.prod(md.size):
            raise ValueError(
                f"{directory}: {key} has {have} elements of shape {tuple(md.size)} in "
                f"{directory / 'sharded'}, this model {tuple(target.shape)}: the sharded checkpoint is "
                "incomplete (a shard file missing) or from another model; resume from another checkpoint"
            )


def _mismatch(directory: Path, wanted: set, have: set) -> None:
    missing, extra = sorted(wanted - have), sorted(have - wanted)
    raise ValueError(
        f"{directory}: checkpoint does not match this model's trainable parameters "
        f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}); was it made with another config?"
    )


def _placed(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this process's slice when ``like`` is a DTensor (every
    process read the same file, so nothing is sent)."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _load_unsharded(directory: Path, model, optimizer, scheduler) -> None:
    """A single-process / DDP checkpoint (trainable.safetensors, optimizer state by index) into a
    model whose trainable tensors may be FSDP shards."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        _mismatch(directory, set(params), set(tensors))
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(
                    f"{directory}: {name} has shape {tuple(tensors[name].shape)}, model has {tuple(p.shape)}"
                )
            p.copy_(_placed(tensors[name], p))
    sd = ckpt.load_state(directory, "optimizer")
    order = [p for g in optimizer.param_groups for p in g["params"]]
    for index, st in sd["state"].items():
        p = order[int(index)]
        for key, value in st.items():
            if torch.is_tensor(value) and value.shape == p.shape:
                st[key] = _placed(value, p)
    optimizer.load_state_dict(sd)
    scheduler.load_state_dict(ckpt.load_state(directory, "scheduler"))
