"""Communication per optimizer step: measured on the collectives a step actually issues, and the
analytic figure it should equal.

Measured. :class:`CommMeter` is a ``TorchDispatchMode``: every process-group collective
dispatched while it is active (``c10d.allreduce_`` from DDP's C++ reducer, FSDP2's
``c10d._allgather_base_`` / ``c10d._reduce_scatter_base_``, functional collectives) is counted with
its payload, the bytes of the *whole* tensor the collective is about:

    all-gather       the gathered output (= the unsharded parameters of a unit, padded)
    reduce-scatter   the input (= the unsharded gradients of a unit, padded)
    all-reduce       the tensor reduced (DDP: its gradient buckets)

The loop measures the forward/backward of the first step only (a Python hook per op: ~0.1 s on
a 1.3 s SmolLM2-135M step), and not under torch.compile (not tried together with a dispatch
mode). A process sends and receives about ``(W-1)/W`` of the payload in an all-gather or a
reduce-scatter and ``2(W-1)/W`` of it in an all-reduce (ring / bandwidth-optimal algorithms; gloo
and NCCL pick their own, so this is the textbook figure, not a packet count).

Analytic (:func:`fsdp_expected`, :func:`ddp_expected`), per optimizer step of ``M`` micro-batches:

    FSDP  all-gather     = M · Σ_units g_u · unsharded bytes of unit u (each parameter padded on
                           dim 0 to a multiple of W; in the mixed-precision dtype when floating),
                           g_u = 2 for a layer unit with reshard_after_forward (forward, then again
                           for the backward), 1 otherwise (the root is never resharded after forward)
          reduce-scatter = Σ_units padded bytes of its trainable parameters (in the reduce dtype),
                           once per step: gradients accumulate unsharded until the last micro-batch
    DDP   all-reduce     = bytes of the trainable gradients, once per step (``no_sync`` before)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..files import format_bytes

KINDS = ("all_gather", "reduce_scatter", "all_reduce")


def _kind(name: str) -> str:
    """``all_gather`` / ``reduce_scatter`` / ``all_reduce`` / the op's own name (``broadcast``)."""
    flat = name.replace("_", "")
    for kind in ("reduce_scatter", "all_gather", "all_reduce"):  # (c10d: allreduce_, functional: all_reduce)
        if kind.replace("_", "") in flat:
            return kind
    return name.strip("_")


def _bytes(value) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or nested lists of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


class CommMeter(TorchDispatchMode):
    """Counts the payload bytes of every collective dispatched while active: ``.bytes[kind]``.

    c10d's in-place ops take ``(outputs, inputs, group, ...)`` or ``(tensors, group, ...)``: the
    payload is the larger side (an all-gather's output, a reduce-scatter's input, the all-reduced
    tensors). Functional collectives return their output: an all-gather's is ``group_size`` times
    its input. Collectives that DTensor issues inside an op this mode dispatches (the global
    gradient norm: a few bytes) are not seen."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        namespace = getattr(func, "namespace", "")
        if namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            name = func.overloadpacket.__name__
            if namespace == "c10d":
                payload = max(_bytes(args[0]), _bytes(args[1]) if len(args) > 1 else 0)
            else:  # functional: the input, or for an all-gather the output it returns
                payload = max(_bytes(args[0]), _bytes(out))
            if payload:
                kind = _kind(name)
                self.bytes[kind] = self.bytes.get(kind, 0) + payload
                self.calls[kind] = self.calls.get(kind, 0) + 1
        return out


def per_process(payload: dict[str, int], world_size: int) -> float:
    """Bytes each process sends (and receives) for ``payload`` with ring algorithms."""
    share = (world_size - 1) / world_size
    return sum(n * (2 * share if kind == "all_reduce" else share) for kind, n in payload.items())


def describe(payload: dict[str, int], step: int, world_size: int) -> str:
    """The run's line: "communication per optimizer step (measured at step 1): all-gather X MB, ..."."""

    def mb(n: float) -> str:
        return format_bytes(n, si=True, digits=2)

    parts = [f"{kind.replace('_', '-')} {mb(payload.get(kind, 0))}" for kind in KINDS]
    parts += [f"{kind} {mb(n)}" for kind, n in sorted(payload.items()) if kind not in KINDS]
    return (
        f"communication per optimizer step (measured at step {step}): {', '.join(parts)}; "
        f"each of the {world_size} processes sends ~{mb(per_process(payload, world_size))}"
    )


# -- the analytic figures ----------------------------------------------------------------------


def padded_bytes(p: torch.Tensor, world_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``p`` (its global shape) padded on dim 0 to a multiple of ``world_size``, as FSDP2
    lays out its shards; ``dtype`` (floating parameters only) for mixed precision."""
    rows = math.ceil(p.shape[0] / world_size) * world_size if p.dim() else world_size
    size = (dtype if dtype is not None and p.is_floating_point() else p.dtype).itemsize
    return rows * (p.numel() // max(p.shape[0], 1) if p.dim() else 1) * size


def fsdp_expected(
    layers: list[nn.Module],
    root: nn.Module,
    world_size: int,
    micro_batches: int,
    reshard_after_forward: bool,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Payload bytes per optimizer step under FSDP (module docstring): ``layers`` are the layer
    units, ``root`` the root unit (which owns every parameter not in a layer)."""
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    units = [(layer, list(layer.parameters()), 2 if reshard_after_forward else 1) for layer in layers]
    units.append((root, [p for p in root.parameters() if id(p) not in in_layers], 1))
    gathered = scattered = 0
    for _, params, gathers in units:
        gathered += gathers * sum(padded_bytes(p, world_size, param_dtype) for p in params)
        grads = [p for p in params if p.requires_grad]
        scattered += sum(padded_bytes(p, world_size, reduce_dtype or param_dtype) for p in grads)
    return {"all_gather": micro_batches * gathered, "reduce_scatter": scattered}


def ddp_expected(model: nn.Module) -> dict[str, int]:
    """Payload bytes per optimizer step under DDP: one all-reduce of the trainable gradients."""
    return {"all_reduce": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)}
