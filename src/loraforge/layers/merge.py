"""Exact merge / unmerge: after any number of merges and unmerges the base weight is the same,
bit for bit, as before the first merge.

Why something must be kept: merging stores W1 = round(W0 + ΔW). Wherever that sum rounds, W0's
low bits are gone, and round(W1 − ΔW) misses W0 by an ulp at a fraction of the weights (measured
for 1024 × 1024, rank 16: 0.2-2 % of them when |ΔW| is 1 % of |W0|, 8-11 % at 10 %, 33-35 % at
100 %; bf16, fp16 and fp32 alike). So merge keeps a ``MergeRecord`` with what unmerge needs:

- the factors as merged, (A, B, s) per adapter (r·(in + out) values each, a few % of the
  weight at r = 16): unmerge subtracts exactly the ΔW that was added, even if the live factors
  were changed meanwhile;
- the misses: the flat positions (int32) where round(W1 − ΔW) ≠ W0 and W0's values there —
  (4 + itemsize) bytes per miss: 6 B for bf16 / fp16, 8 B for fp32. Where that would exceed a
  full copy of W0 (itemsize bytes per weight, i.e. above 1/3 misses in half precision and 1/2 in
  fp32) the copy is kept instead. Memory per merged weight element is therefore
  min(miss_fraction · (4 + itemsize), itemsize): ~0.06-0.12 B for a trained adapter
  (|ΔW| ≈ 1 % of |W0|, bf16; 0.06 B of it the r = 16 factors of a 2048 × 2048 layer), at most
  itemsize + the factors: 2 B (bf16 / fp16) or 4 B (fp32);
- on a 4-bit base, a copy of the packed weight and its quant state (0.5 B + the absmax per
  weight): the merge requantizes, and the copy is put back as it was.

The misses are found at merge time by computing W1 − ΔW exactly as unmerge will, so unmerge is
exact as long as it repeats the same operations on the same bits: it does, from the recorded
factors, on the device they were merged on (the record does not move with the model; a weight
moved meanwhile is brought there for the subtraction), with full-precision fp32 matmuls (no
TF32 / reduced-precision modes, whatever the global setting); a matmul of the same operands and
shapes on the same device gives the same bits. Where the base stores a plain matrix in the
factors' dtype, ΔW is added and subtracted by in-place ``addmm_`` (no ΔW temporary): unmerge
is then one ``addmm_`` and a scatter of the misses, as fast as a plain subtraction; merge takes
a temporary copy of W0, three ``addmm_`` (add, subtract to find the misses, add again) and a
comparison, about three times a plain merge's memory traffic (BENCHMARKS.md, switch row).

All of it lives on the layer as a plain attribute (not in ``state_dict``) only while an adapter
is merged; the forward never reads it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings

import numpy as np
import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclasses.dataclass
class MergeRecord:
    """What one layer keeps while adapters are merged into it (see the module docstring)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # adapter -> (A, B, s) as merged
    dtype: torch.dtype | None = None  # the base weight's dtype and shape at merge time
    shape: tuple[int, ...] = ()
    index: torch.Tensor | None = None  # flat positions of the misses
    values: torch.Tensor | None = None  # W0 at those positions
    copy: torch.Tensor | None = None  # all of W0 (dense fallback), or the packed 4-bit weight
    quant_state: object = None  # the 4-bit base's quant state before the merge
    scales: dict = dataclasses.field(default_factory=dict)  # DoRA adapter -> (m, f) as merged (dora.py)

    def nbytes(self) -> int:
        """Bytes held for the restore (factors included)."""
        tensors = [t for a, b, _ in self.factors.values() for t in (a, b)]
        tensors += [t for t in (self.index, self.values, self.copy) if t is not None]
        tensors += [t for pair in self.scales.values() for t in pair]
        state = self.quant_state
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            state = state.state2
        return sum(t.numel() * t.element_size() for t in tensors)


def snapshot_factors(layer, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for n in names:
        a, b = layer.factors(n)
        out[n] = (a.detach().clone(), b.detach().clone(), layer.scaling[n])
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (so -0.0 ≠ 0.0 and NaN payloads compare too)."""
    return t.view(_BITS[t.element_size()])


def _differ(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-major flat positions (int64) where two contiguous tensors differ in any bit."""
    bx, by = _bits(x).view(-1), _bits(y).view(-1)
    if bx.device.type == "cpu":  # numpy's compare + flatnonzero: ~3x torch's ne + nonzero on CPU
        return torch.from_numpy(np.flatnonzero(bx.numpy() != by.numpy()))
    return (bx != by).nonzero().view(-1)


@contextlib.contextmanager
def exact_matmul():
    """fp32 matmuls in full precision within the block (ΔW must come out the same bits at merge
    and at unmerge, whatever ``torch.set_float32_matmul_precision`` says in between)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def add_exactly(w: torch.Tensor, apply, factors, device) -> MergeRecord:
    """w ← w + ΔW in place, where ``apply(t, sign)`` adds sign·ΔW to a tensor t like w, in place
    and the same way every time (on ``device``, the factors'). Returns the record with which
    :func:`subtract_exactly` gives w back."""
    with torch.no_grad():
        t = w.detach().to(device).contiguous()  # w itself unless it is elsewhere or strided
        original = t.clone()
        apply(t, 1.0)
        apply(t, -1.0)  # what unmerge will compute before the fix-ups
        miss = _differ(t, original)
        record = MergeRecord(factors, w.dtype, tuple(w.shape))
        index_dtype = torch.int32 if original.numel() < 2**31 else torch.int64
        item, index_size = original.element_size(), torch.tensor([], dtype=index_dtype).element_size()
        if miss.numel() * (index_size + item) < original.numel() * item:
            record.index = miss.to(index_dtype)
            record.values = original.view(-1).index_select(0, miss)
        else:
            record.copy = original
        # W0 again, then W0 + ΔW: the same operations on the same bits give the same merged bits
        t.copy_(original)
        apply(t, 1.0)
        if t.data_ptr() != w.data_ptr():
            w.copy_(t)
    return record


def subtract_exactly(w: torch.Tensor, apply, record: MergeRecord, device, where: str) -> None:
    """Undo :func:`add_exactly`: ``apply(t, -1.0)`` with the recorded factors, then the misses."""
    with torch.no_grad():
        if record.copy is not None:
            w.copy_(record.copy)
            return
        t = w.detach().to(device).contiguous()  # w itself unless it moved or is strided
        apply(t, -1.0)
        if w.dtype != record.dtype or tuple(w.shape) != record.shape:
            warnings.warn(
                f"{where}: the base weight became {w.dtype} {tuple(w.shape)} while merged (was "
                f"{record.dtype} {record.shape}); unmerge subtracted ΔW, which is exact only up to rounding",
                stacklevel=4,
            )
        else:
            t.view(-1).index_copy_(0, record.index.long(), record.values)
        if t.data_ptr() != w.data_ptr():
            w.copy_(t)


def snapshot_quantized(base, factors) -> MergeRecord:
    """The 4-bit base's packed weight and quant state, copied before a requantizing merge."""
    packed, state = base.weight.detach().clone(), copy.deepcopy(base.quant_state)
    return MergeRecord(factors, copy=packed, quant_state=state)


def restore_quantized(base, record: MergeRecord) -> None:
    packed = record.copy.to(base.weight.device)
    base.weight = torch.nn.Parameter(packed, requires_grad=False)
    base.quant_state = record.quant_state.to(packed.device)
