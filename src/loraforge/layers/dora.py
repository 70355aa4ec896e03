"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) on any LoRA wrapper.

DoRA splits the adapted weight into a direction and a learned length per output channel:

    W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖        ΔW = s·B·A,   m (out), ‖·‖ per output channel

(rows of a linear weight, output channels of a convolution, columns of an embedding table).
As in the paper (section 4.3) and PEFT, the norm is a constant in backward: no gradient flows
through it, so with f = m / ‖W0 + ΔW‖ (detached norm) the layer computes

    y = b + f ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ)            = f ⊙ (LoRA's output − b) + b

i.e. the LoRA output z (base + low-rank, whatever path computed it: the fused function, the
4-bit base, a mixed batch) rescaled per channel: ``out = b·(1 − f) + f·z``, one ``addcmul``.
Gradients: ∂L/∂z = f ⊙ G, ∂L/∂m = Σ G ⊙ (z − b) / ‖·‖. With LoRA dropout in training PEFT
runs the base a second time on the dropped-out input x̃, and so do we:
y = base(x) + (f − 1) ⊙ x̃·W0ᵀ + f ⊙ s·B·A·x̃.  Several active adapters apply in turn, each
rescaling what the previous ones produced (PEFT's order), which is also what merging them in
turn gives.

The norm without forming B·A (out × in):
    ‖W0 + sBA‖²_i = ‖W0_i‖² + 2s·Σ_k B_ik (W0·Aᵀ)_ik + s²·Σ_kl B_ik (A·Aᵀ)_kl B_il
one (out × in × r) product W0·Aᵀ per step; ‖W0‖² is kept from step to step (W0 is frozen).

Parameters follow PEFT: ``lora_magnitude_vector.<adapter>.weight``, shape (out,), or
(1, out, 1, ...) on a convolution; in files ``<path>.lora_magnitude_vector``. m starts as
‖W0 + ΔW‖ of the initial factors (W0 dequantized on a 4-bit base), so f = 1 at the start.

Mixed batches and serving steps (one adapter per row / token) rescale the rows of DoRA adapters
after LoRA's batched sums (PEFT refuses DoRA there). Merging applies W ← f ⊙ (W + ΔW) adapter by
adapter with f from the unmerged base, and the merge record (``merge.py``) gives W0 back bit for
bit. The norm is always taken of the base as it stands: a DoRA adapter running unmerged on top of
other, merged adapters normalises W0 + ΔW_merged + ΔW (PEFT never runs that combination).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kinds import is_4bit, is_conv1d
from .tokens import tokens_first

MAGNITUDE = "lora_magnitude_vector"


class Magnitude(nn.Module):
    """m: one learned length per output channel (PEFT's ``lora_magnitude_vector.<name>``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def supported(base: nn.Module) -> bool:
    """DoRA's bases: nn.Linear, GPT-2 Conv1D, 4-bit linears, nn.Embedding, nn.Conv1d/2d/3d."""
    if isinstance(base, nn.modules.conv._ConvNd):
        return not base.transposed
    return isinstance(base, (nn.Linear, nn.Embedding)) or is_conv1d(base) or is_4bit(base)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """ValueError naming the first target DoRA cannot adapt (before the model changes)."""
    for name in targets:
        module = model.get_submodule(name)
        base = getattr(module, "base_layer", module)
        if not supported(base):
            raise ValueError(
                f"use_dora: target {name!r} is a {type(base).__name__}; DoRA supports Linear, GPT-2 Conv1D, "
                "4-bit linears, Embedding and Conv1d/2d/3d"
            )


def magnitude_shape(base: nn.Module) -> tuple[int, ...]:
    """m's shape on ``base`` as PEFT stores it: (out,), or (1, out, 1, ...) on a convolution."""
    if isinstance(base, nn.modules.conv._ConvNd):
        return (1, base.out_channels) + (1,) * (base.weight.dim() - 2)
    if is_4bit(base):
        return (base.out_features,)
    if is_conv1d(base) or isinstance(base, nn.Embedding):
        return (base.weight.shape[1],)
    return (base.weight.shape[0],)


def is_dora(layer: nn.Module, name: str) -> bool:
    return name in layer._modules.get(MAGNITUDE, ())


def add_magnitude(layer: nn.Module, name: str) -> None:
    """Give adapter ``name`` of ``layer`` its magnitude m = ‖W0 + ΔW‖ (the current factors)."""
    if not supported(layer.base_layer):
        raise ValueError(f"use_dora: DoRA does not support a {type(layer.base_layer).__name__} base")
    if MAGNITUDE not in layer._modules:
        layer.add_module(MAGNITUDE, nn.ModuleDict())
        # (an instance attribute: the layers' bookkeeping, set_trainable and the files iterate it)
        layer.adapter_param_names = tuple(layer.adapter_param_names) + (MAGNITUDE,)
    a, b = layer.factors(name)
    if layer.base_layer.weight.device.type == "meta":
        # a skeleton whose weights come later (training/sharded_load.py calls this again then)
        norm = torch.empty(magnitude_shape(layer.base_layer), device="meta")
    else:
        norm = weight_norm(layer, a, b, layer.scaling[name])
    mag = Magnitude(norm.to(a.dtype).reshape(magnitude_shape(layer.base_layer)))
    layer.lora_magnitude_vector[name] = mag.train(layer.training)


# -- the norm ---------------------------------------------------------------------------------
def _base_matrix(layer: nn.Module) -> torch.Tensor:
    """W0 as the fp32 (out × in_flat) matrix that B·A adapts (a view where it can be)."""
    base = layer.base_layer
    w = base.dequantize(torch.float32) if is_4bit(base) else layer.base_weight().float()
    return layer._ba_layout(w)


def _low_rank_delta(layer: nn.Module) -> bool:
    """Whether ΔW = s·B·A in ``_ba_layout`` with A, B flattened to 2-D (LoRA's plain layers): then
    the norm needs no (out × in) ΔW; other wrappers (e.g. grouped convolutions) form ΔW."""
    from .base import LoraLayer
    from .conv import LoraConv2d
    from .embedding import LoraEmbedding

    plain = (LoraLayer._delta, LoraEmbedding._delta, LoraConv2d._delta)
    return type(layer)._delta in plain and getattr(layer.base_layer, "groups", 1) == 1


def _stamp(*items) -> tuple:
    """What identifies the values of tensors (and scalars) for the caches below: the object, its
    storage, dtype and version counter (bumped by every in-place update; ``module.to()`` swaps
    the storage and dtype instead). RuntimeError for inference tensors, which keep no version."""
    out = []
    for t in items:
        out += [t, t.data_ptr(), t.dtype, t.device, t._version] if isinstance(t, torch.Tensor) else [t]
    return tuple(out)


def _fresh(cached, stamp: tuple) -> bool:
    return (
        cached is not None
        and len(cached[0]) == len(stamp)
        and all(x is y if isinstance(x, torch.Tensor) else x == y for x, y in zip(cached[0], stamp))
    )


def _w0_squares(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """‖W0_i‖² per output channel, kept while the base weight is unchanged (it is frozen)."""
    if torch.compiler.is_compiling():  # (no storage pointers in a traced graph: computed in it)
        return w.square().sum(1)
    try:
        stamp = _stamp(layer.base_layer.weight)
    except RuntimeError:  # an inference tensor
        return w.square().sum(1)
    cached = layer.__dict__.get("_dora_w0")
    if _fresh(cached, stamp):
        return cached[1]
    squares = w.square().sum(1)
    layer.__dict__["_dora_w0"] = (stamp, squares)  # (a plain attribute: not in state_dict)
    return squares


def weight_norm(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W0 + s·B·A‖ per output channel, fp32, shape (out,), without gradient."""
    with torch.no_grad():
        w = _base_matrix(layer)
        if getattr(layer.base_layer, "groups", 1) > 1:
            # A grouped convolution's B·A is no dense kernel (it cannot merge); PEFT's norm takes
            # the (out/g × in·k) product B·A read in the weight's shape, and so do we.
            r = a.shape[0]
            delta = (b.detach().float().reshape(-1, r) @ a.detach().float().reshape(r, -1)) * scaling
            return torch.linalg.vector_norm(w + delta.reshape(w.shape), dim=1)
        if not _low_rank_delta(layer):
            delta = layer._ba_layout(layer._delta(a.detach(), b.detach(), scaling))
            return torch.linalg.vector_norm(w + delta.to(w.device), dim=1)
        a2 = a.detach().float().reshape(a.shape[0], -1)  # (r × in)
        b2 = b.detach().float().reshape(b.shape[0], -1)  # (out × r)
        cross = (b2 * (w @ a2.T)).sum(1)  # Σ_j W0_ij (BA)_ij
        square = ((b2 @ (a2 @ a2.T)) * b2).sum(1)  # ‖(BA)_i‖²
        total = _w0_squares(layer, w) + (2 * scaling) * cross + (scaling * scaling) * square
        return total.clamp_min_(0).sqrt_()  # (rounding could take an all-but-zero row below 0)


def _norm(layer: nn.Module, name: str) -> torch.Tensor:
    """The live adapter's norm; without gradients (serving) kept until a factor, the scaling or
    the base changes."""
    a, b = layer.factors(name)
    s = layer.scaling[name]
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return weight_norm(layer, a, b, s)
    try:
        stamp = _stamp(a, b, s, layer.base_layer.weight)
    except RuntimeError:
        return weight_norm(layer, a, b, s)
    cache = layer.__dict__.setdefault("_dora_norms", {})
    if not _fresh(cache.get(name), stamp):
        cache[name] = (stamp, weight_norm(layer, a, b, s))
    return cache[name][1]


def forget(layer: nn.Module) -> None:
    """Drop the kept norms (the base weight was merged into or restored)."""
    layer.__dict__.pop("_dora_w0", None)
    layer.__dict__.pop("_dora_norms", None)


def scale(layer: nn.Module, name: str) -> torch.Tensor:
    """f = m / ‖W0 + ΔW‖ (out,), differentiable in m only."""
    return layer.lora_magnitude_vector[name].weight.reshape(-1) / _norm(layer, name)


# -- the forward ------------------------------------------------------------------------------
def _channel_dim(layer: nn.Module, t: torch.Tensor) -> int:
    """The output-channel dim of ``t``: the last of a linear or embedding output, -(k+1) of a k-d
    convolution's (1 when batched)."""
    base = layer.base_layer
    k = base.weight.dim() - 2 if isinstance(base, nn.modules.conv._ConvNd) else 0
    return t.dim() - k - 1


def _view(layer: nn.Module, v: torch.Tensor, t: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """``v`` (out,) — or (rows × out) with ``rows`` — shaped to broadcast over ``t``'s channels
    (and its dim 0)."""
    shape = [1] * t.dim()
    shape[_channel_dim(layer, t)] = -1
    if rows:
        shape[0] = v.shape[0]
    return v.reshape(shape)


def _bias(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer.base_layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _rescale(layer: nn.Module, z: torch.Tensor, f: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """b·(1 − f) + f·z, with f (out,) or, with ``rows``, one f per row of z (rows × out);
    computed in the branch dtype (see ``LoraLayer.compute``) and returned in z's. Every caller
    passes a z of its own (a fresh sum), so without autograd (inference, serving) it is
    rescaled in place: no second (tokens × out) buffer."""
    dtype = layer.branch_dtype(z.dtype, f.dtype)
    fv = _view(layer, f.to(dtype), z, rows)
    bias = _bias(layer)
    bv = None if bias is None else _view(layer, bias.to(dtype), z)
    if dtype == z.dtype and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        z.mul_(fv)
        return z if bv is None else z.add_(bv - bv * fv)
    zc = z.to(dtype)
    if bv is None:
        return (zc * fv).to(z.dtype)
    return torch.addcmul(bv - bv * fv, zc, fv).to(z.dtype)


def finish(layer: nn.Module, z: torch.Tensor, name: str) -> torch.Tensor:
    """LoRA's output z of adapter ``name`` made DoRA's (unchanged for a plain LoRA adapter)."""
    return _rescale(layer, z, scale(layer, name)) if is_dora(layer, name) else z


def add(layer: nn.Module, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``result`` (the output so far) with DoRA adapter ``name`` applied to input ``x``."""
    drop = layer.lora_dropout[name]
    if not hasattr(layer, "lora_A") or isinstance(drop, nn.Identity) or not drop.training:
        # (embeddings have no dropout: PEFT's neither)
        return _rescale(layer, layer._add_lora(result, x, name), scale(layer, name))
    # Dropout in training: the base again on the dropped-out input, as PEFT does.
    xd = drop(x)
    base = layer.base_layer(xd)
    bias = _bias(layer)
    if bias is not None:
        base = base - _view(layer, bias, base)
    a, b = layer.lora_A[name], layer.lora_B[name]
    inner = base + b(a(xd.to(a.weight.dtype))) * layer.scaling[name]
    return ((result - base) + _view(layer, scale(layer, name), inner) * inner).to(result.dtype)


def rescale_rows(layer: nn.Module, result: torch.Tensor, names: list[str]) -> torch.Tensor:
    """A mixed batch (row i on adapter names[i]) after LoRA's sums: rows of DoRA adapters rescaled."""
    if MAGNITUDE not in layer._modules or not any(is_dora(layer, n) for n in set(names)):
        return result
    uniq, idx = layer._row_index(names, result.shape[0], result.device)
    ones = torch.ones(result.shape[_channel_dim(layer, result)], device=result.device)
    table = torch.stack([scale(layer, n) if is_dora(layer, n) else ones for n in uniq])
    return _rescale(layer, result, table[idx], rows=True)


def rescale_tokens(layer: nn.Module, result: torch.Tensor, plan) -> torch.Tensor:
    """A serving step (one adapter per token, ``tokens.py``) after LoRA's sums: the tokens of
    DoRA adapters rescaled."""
    if MAGNITUDE not in layer._modules:
        return result
    groups = plan.groups(layer.r, result.device)
    dora_rows = {n: rows for n, rows in (groups.rows.items() if groups else ()) if is_dora(layer, n)}
    if not dora_rows:
        return result
    out = tokens_first(result, plan.num_tokens)  # (T, ...)
    table = torch.ones((out.shape[0], out.shape[_channel_dim(layer, out)]), device=out.device)
    for n, rows in dora_rows.items():
        table = table.index_copy(0, rows, scale(layer, n).expand(len(rows), -1))
    return _rescale(layer, out, table, rows=True).reshape(result.shape)


# -- merging ----------------------------------------------------------------------------------
def merge_scales(layer: nn.Module, factors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{adapter: (m, f)} for the DoRA adapters among the (A, B, s) ``factors`` about to be merged:
    m as merged and f = m / ‖W0 + ΔW‖ from the unmerged base (fp32, on the factors' device)."""
    out = {}
    for n, (a, b, s) in factors.items():
        if is_dora(layer, n):
            m = layer.lora_magnitude_vector[n].weight.detach().clone()
            out[n] = (m, (m.float().reshape(-1) / weight_norm(layer, a, b, s).to(m.device)).to(a.device))
    return out


def stored_view(layer: nn.Module, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f shaped to scale the output channels of the weight as the base stores it (rows; columns
    for GPT-2 Conv1D and embedding tables; dim 0 of a convolution's kernel)."""
    shape = [1] * t.dim()
    shape[1 if layer.stores_transposed else 0] = -1
    return f.to(t.device, t.dtype).reshape(shape)


def apply_merge(layer: nn.Module, w: torch.Tensor, factors: dict, scales: dict, sign: float) -> torch.Tensor:
    """The stored weight w (fp32) with the adapters merged in turn (sign +1): W ← f ⊙ (W + ΔW) for
    a DoRA adapter, W + ΔW for a LoRA one; or taken out in reverse (sign −1). In place."""
    items = list(factors.items())
    for n, f in reversed(items) if sign < 0 else items:
        delta = layer._stored_delta({n: f}).to(w.device)
        if sign > 0:
            w.add_(delta)
        if n in scales:
            fv = stored_view(layer, scales[n][1], w)
            w.mul_(fv) if sign > 0 else w.div_(fv)
        if sign < 0:
            w.sub_(delta)
    return w


def merge_dense(layer: nn.Module, w: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The stored weight w (fp32, unmerged) with adapters ``names`` merged in turn, in place."""
    from .merge import snapshot_factors

    factors = snapshot_factors(layer, names)
    return apply_merge(layer, w, factors, merge_scales(layer, factors), 1.0)


def changed(layer: nn.Module, name: str, scales: dict) -> bool:
    """Whether a merged DoRA adapter's magnitude changed since its merge."""
    if name not in scales or not is_dora(layer, name):
        return False
    m = layer.lora_magnitude_vector[name].weight
    return not torch.equal(scales[name][0].to(m.device), m)
