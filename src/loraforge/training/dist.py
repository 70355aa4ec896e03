"""torch.distributed set-up for ``torchrun``: one process per device, NCCL on GPUs, gloo on CPU.

Under DDP only the trainable tensors take part in DistributedDataParallel's gradient all-reduce;
the frozen base is identical on every process by construction (same files, same seed) and is
never sent. Under FSDP (``train.distributed: fsdp``, see ``fsdp.py``) every process holds a shard
of the model instead; a single process then still forms a process group of one (FSDP2 needs a
device mesh), without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td
from torch import nn

from ..files import format_bytes
from ..injection import count_parameters


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mode: str = "ddp"  # ddp | fsdp (train.distributed)
    mesh: object = None  # FSDP's 1-D DeviceMesh over every process; None under DDP

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str = "auto", mode: str = "ddp", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), or, for FSDP in a
    single process, form a group of one. ``timeout_s`` bounds every collective: a process whose
    peer died or hangs stops with an error instead of waiting forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    needs_group = world > 1 or mode == "fsdp"
    if needs_group and not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if world > 1 or "MASTER_ADDR" in os.environ:
            td.init_process_group(backend=backend, timeout=timeout)
        else:  # one process, no torchrun: an in-memory store, nothing listens on a port
            store = td.HashStore()
            td.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    info = DistInfo(rank, local_rank, world, device, mode)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        info.mesh = init_device_mesh(device.type, (world,))
    return info


def cleanup(info: DistInfo) -> None:
    """Leave the process group at the end of a run, all processes together: the main one writes
    the results first, and a rank that tore down its gloo connections meanwhile was seen to abort
    ("terminate called without an active exception") in one CI run out of several. (Were the main
    process to fail before this point, torchrun stops the others: nobody waits here forever.)"""
    if (info.enabled or info.fsdp) and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def all_reduce_sum(info: DistInfo, *values: float) -> list[float]:
    """Sum Python numbers over processes (one small all-reduce)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    td.all_reduce(t)
    return t.tolist()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel over the trainable tensors only."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Frozen tensors and buffers are neither broadcast at start-up nor reduced.
    module._ddp_params_and_buffers_to_ignore = [
        n for n, p in module.named_parameters() if not p.requires_grad
    ] + [n for n, _ in module.named_buffers()]
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def communication_report(model: nn.Module, world_size: int) -> str:
    """Bytes all-reduced per optimizer step: the trainable gradients vs full fine-tuning's."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    sent = sum(p.numel() * p.element_size() for p in trainable)
    grad_bytes = trainable[0].element_size() if trainable else 4
    total = count_parameters(model)[1]
    full = total * grad_bytes
    ring = (
        2 * (world_size - 1) / world_size
    )  # bytes each process sends in a ring all-reduce, per payload byte

    def mb(n: float) -> str:
        return format_bytes(n, si=True, digits=2)

    return (
        f"all-reduce per optimizer step: {mb(sent)} ({sent:,} bytes) of trainable gradients "
        f"({len(trainable)} tensors; each process sends ~{mb(sent * ring)}) vs {mb(full)} for full "
        f"fine-tuning ({full / max(sent, 1):.1f}x more)"
    )
