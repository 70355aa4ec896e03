"""torch.distributed set-up for ``torchrun``: one process per device, NCCL on GPUs, gloo on CPU.

Under DDP only the trainable tensors take part in DistributedDataParallel's gradient all-reduce;
the frozen base is identical on every process by construction (same files, same seed) and is
never sent. Under FSDP (``train.distributed: fsdp``, see ``fsdp.py``) every process holds a shard
of the model instead; a single process then still forms a process group of one (FSDP2 needs a
device mesh), without torchrun.

Failures. ``train.dist_timeout`` bounds every collective and the start-up rendezvous. A process
that dies (kill -9, OOM) closes its connections: the others' next collective fails at once; one
that hangs makes them fail after the timeout; one that never starts makes the others' start-up
fail after it. ``lost_contact`` recognises these errors (whatever class gloo, NCCL or the store
raise) and the loop turns them into one line per surviving process (``lost_contact_error``),
after leaving the group without a barrier (``abort``). ``comm.py`` measures what a step sends.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td
from torch import nn

from ..files import format_bytes
from ..injection import count_parameters
from .lock import RunError


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
            try:
                td.init_process_group(backend=backend, timeout=timeout)
            except RuntimeError as e:  # DistStoreError / DistNetworkError: somebody never came
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise RunError(
                    f"rank {rank} of {world}: the {world} processes did not all join at {where} within "
                    f"train.dist_timeout={timeout_s:g}s ({first_line(e)}); check that every process "
                    "was started (same MASTER_ADDR/MASTER_PORT or rendezvous endpoint) and can reach it"
                ) from None
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
    ("terminate called without an active exception") in one CI run out of several. (Were a process
    to fail before this point, the barrier fails on the others, at once or after train.dist_timeout:
    nobody waits here forever.)"""
    if (info.enabled or info.fsdp) and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def abort(info: DistInfo) -> None:
    """Leave the process group after a failure, without waiting for anybody (no barrier): the
    peers may be gone. Best effort: the process is about to report the failure and exit."""
    if not td.is_initialized():
        return
    try:
        if info.device.type == "cuda":
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()  # NCCL: a destroy could wait on a broken communicator
        else:
            td.destroy_process_group()
    except Exception:  # noqa: BLE001 - the failure being reported matters, not this one
        pass


# What gloo, NCCL and the c10d store raise when a peer is gone or silent (their messages; the
# exception types vary with the backend and the torch version: RuntimeError, DistBackendError,
# DistNetworkError, DistStoreError).
_LOST = re.compile(
    r"connection (closed|reset|refused)|broken pipe|timed out|\btimeout|\b(socket|peer|gloo|nccl|c10d)\b|"
    r"processgroup|\bstore\b",
    re.IGNORECASE,
)


def lost_contact(info: DistInfo, error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a collective that failed because another process
    died, hung or became unreachable. Only in a run of several processes."""
    if not info.enabled:
        return False
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, td.DistError):
            return True
        if isinstance(e, RuntimeError) and _LOST.search(str(e)):
            return True
        # DCP's CheckpointException (a BaseException) carries each rank's exception
        failures = getattr(e, "_failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def lost_contact_error(
    info: DistInfo, where: str, error: BaseException, newest, timeout_s: float
) -> RunError:
    """The one line every surviving process reports when a peer is gone (``where``: "at step 7")."""
    resume = f"resume with --resume from {newest}" if newest else "no checkpoint was saved yet: start again"
    return RunError(
        f"rank {info.rank} of {info.world_size}: lost contact with another process {where} "
        f"({first_line(_cause(error))}); the run stopped (train.dist_timeout={timeout_s:g}s bounds each "
        f"wait); {resume}"
    )


def _cause(error: BaseException) -> BaseException:
    """The communication error itself: DCP's CheckpointException wraps it with every rank's traceback."""
    failures = getattr(error, "_failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, without gloo's / NCCL's ``[file.cc:123] `` prefix."""
    lines = [s.strip() for s in str(error).splitlines() if s.strip()]
    text = (lines[0] if lines else type(error).__name__).split(". ")[0]  # (gloo then adds advice)
    return re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)


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
