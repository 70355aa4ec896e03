"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-aware Quantization"): ``init="loftq"``.

QLoRA starts from Q = quant(W) and B·A = 0, so the model it fine-tunes is off by W − Q from the
start. LoftQ picks Q and the LoRA factors together, alternating T = ``loftq_iter`` times

    Q_t = quant(W − s·B_{t−1}·A_{t−1})          (B_0·A_0 = 0)
    s·B_t·A_t = the best rank-r approximation of W − Q_t  (truncated SVD: U_r Σ_r V_rᵀ)

so that Q + s·B·A is closer to W than Q alone: ‖W − (Q + s·B·A)‖ < ‖W − quant(W)‖. With
W − Q_T = U Σ Vᵀ: B = U_r·√(Σ_r/s), A = √(Σ_r/s)·V_rᵀ (the √ split as PEFT's ``L``, ``R``).

The quantizers are PEFT 0.21's (``peft.utils.loftq_utils.loftq_init``, which calls bitsandbytes):

* 4 bits: NF4 in blocks of 64 without double quantization (bitsandbytes' ``Params4bit(...,
  compress_statistics=False, quant_type="nf4")``), here through loraforge's bit-exact NF4
  (``loraforge.quant.nf4``), on any device;
* 8 bits: bitsandbytes' ``Int8Params``: the weight in fp16, each row scaled by 127 / its absmax
  and rounded to int8; dequantized as ``q · absmax · (1/127)``;
* 2 bits: refused. PEFT 0.20 removed its own uniform / normal-float quantizer (which alone had 2
  bits) and 0.21 accepts only 4 and 8; a 2-bit LoftQ would match nothing PEFT can load.

What the base becomes (the choice PEFT makes, and what its documented LoftQ flow needs): the
full-precision base weight is replaced by the dequantized Q, kept in its own dtype; the adapter
holds A and B. Save that base (``lf.save_model``) and quantize it later (``lf.quantize`` /
``QuantConfig(blocksize=64, double_quant=False)``, or bitsandbytes' 4-bit loading): Q is already
on the NF4 grid, so the 4-bit model holds Q exactly and Q + s·B·A is what QLoRA fine-tunes. (With
double quantization the absmax values are rounded again and Q moves slightly.) ``inject`` with
init="loftq" on a base that is already 4-bit is refused: its W is gone, so there is no residual
W − Q to approximate (PEFT, too, wants the unquantized model; its ``replace_lora_weights_loftq``
reads W back from the checkpoint for that case). *Loading* a LoftQ adapter onto a 4-bit base is
that flow's second stage: ``load_adapter`` then keeps the quantized base as Q and takes A and B
from the file (the adapter is recorded with the default init, as PEFT's LoftQ example saves it
for the 4-bit stage). Onto a full-precision base, loading reruns LoftQ, as PEFT does.

Two differences from PEFT, both deliberate: PEFT stores B = L, A = R without the scale, so its
Q + s·B·A approximates W only at s = alpha / r = 1; here the factors carry 1/√s each and the
approximation holds for every alpha (at s = 1 the two agree). And besides ``nn.Linear`` (PEFT's
only working case) the same is done for GPT-2 ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d``:
Q is formed in the layout the base stores (as a 4-bit load would quantize it), the SVD in B·A's.
"""

from __future__ import annotations

import torch
from torch import nn

from .kinds import is_4bit
from .quant.nf4 import dequantize_4bit, quantize_4bit

LOFTQ_BITS = (4, 8)
_INV_127 = 7.874015718698502e-3  # bitsandbytes' fp32 reciprocal of 127


def quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """quant(W) dequantized, fp32, W's shape, as PEFT's LoftQ quantizes (see module docstring)."""
    if bits not in LOFTQ_BITS:
        raise ValueError(
            f"loftq_bits={bits!r}: LoftQ quantizes to 4 bits (NF4) or 8 bits (int8), as PEFT 0.21 does "
            "(PEFT has no 2-bit quantizer since 0.20)"
        )
    w = weight.detach().float()
    if bits == 4:
        packed, state = quantize_4bit(w, "nf4", blocksize=64, double_quant=False)
        return dequantize_4bit(packed, state, torch.float32).reshape(w.shape)
    rows = w.reshape(w.shape[0], -1).half()  # (bitsandbytes casts to fp16 first)
    absmax = rows.abs().amax(dim=1).float()
    q = torch.round(rows * (127.0 / absmax.unsqueeze(-1))).to(torch.int8)
    return (q * absmax.view(-1, 1) * _INV_127).reshape(w.shape)


def loftq(
    weight: torch.Tensor,
    rank: int,
    bits: int = 4,
    iters: int = 1,
    scaling: float = 1.0,
    to_ba=None,
    from_ba=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, A, B) with Q = quant(…) dequantized (fp32, ``weight``'s layout) and Q + s·B·A ≈ W.

    ``to_ba`` / ``from_ba`` map the stored layout to B·A's (out × in) matrix and back (identity
    for a linear weight (out × in)). A (r × in), B (out × r), fp32.
    """
    if iters < 1:
        raise ValueError(f"loftq_iter must be a positive integer, got {iters!r}")
    to_ba = to_ba or (lambda t: t)
    from_ba = from_ba or (lambda t: t)
    w = weight.detach().float()
    target = w
    for i in range(iters):
        q = quantize_roundtrip(target, bits)
        u, sv, vh = torch.linalg.svd(to_ba(w - q), full_matrices=False)
        root = torch.sqrt(sv[:rank] / scaling)
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root
        if i + 1 < iters:
            target = w - from_ba(scaling * (b @ a))
    return q, a, b


def check_target(name: str, base: nn.Module, bits: int = 4) -> None:
    """Refuse a base or a bit width LoftQ cannot start from (before the model changes)."""
    if bits not in LOFTQ_BITS:
        quantize_roundtrip(base.weight[:0], bits)  # (raises its message)
    if is_4bit(base):
        raise ValueError(
            f"init='loftq' on {name!r}: the base layer is already 4-bit, so its full-precision weight is "
            "gone; run LoftQ on the full-precision model, save it (its weights become Q) and quantize "
            "that (NF4, blocksize 64, no double quantization), as PEFT's LoftQ flow does"
        )


def init_loftq(layer, name: str, bits: int = 4, iters: int = 1) -> None:
    """LoftQ for adapter ``name`` of a LoRA layer: set its A, B and replace the base weight by Q."""
    base = layer.base_layer
    check_target(type(base).__name__, base, bits)
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        kind = type(base).__name__
        raise ValueError(f"init='loftq' needs a base layer with a floating-point weight, got {kind}")
    shape = w.shape

    def to_ba(t):  # stored layout -> B·A's (out × in_flat)
        return t.T if layer.stores_transposed else t.reshape(t.shape[0], -1)

    def from_ba(t):
        return t.T if layer.stores_transposed else t.reshape(shape)

    q, a, b = loftq(w, layer.r[name], bits, iters, layer.scaling[name], to_ba, from_ba)
    fa, fb = layer.factors(name)
    layer.set_factors(name, a.to(fa.dtype), b.to(fb.dtype))
    with torch.no_grad():
        w.copy_(q.to(w.dtype))


def relative_errors(weight: torch.Tensor, rank: int, bits: int = 4, iters: int = 1) -> tuple[float, float]:
    """(‖W − Q₀‖ / ‖W‖, ‖W − (Q + B·A)‖ / ‖W‖) for a linear weight (out × in), Q₀ = quant(W): the
    error QLoRA starts from and LoftQ's (s = 1; the scale does not change the product)."""
    w = weight.detach().float()
    plain = quantize_roundtrip(w, bits)
    q, a, b = loftq(w, rank, bits, iters)
    norm = torch.linalg.norm(w)
    return float(torch.linalg.norm(w - plain) / norm), float(torch.linalg.norm(w - q - b @ a) / norm)


__all__ = ["LOFTQ_BITS", "check_target", "init_loftq", "loftq", "quantize_roundtrip", "relative_errors"]
