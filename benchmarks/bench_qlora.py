"""QLoRA benchmarks: the training step on a 4-bit base, and the 4-bit linear layer alone.

The peer is transformers + PEFT + bitsandbytes as users build it: the model is saved and loaded
back with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...))``, which
works on CPU with bitsandbytes 0.50 and turns every decoder ``nn.Linear`` (not the LM head) into a
``bnb.nn.Linear4bit``; PEFT then wraps those with its bitsandbytes LoRA layer. loraforge quantizes
the same modules with ``lf.quantize`` (``skip_modules=["lm_head"]``). Both formats are
byte-identical (issue 3), so the two models hold the same 4-bit weights and give the same loss.

Training runs in train mode on both sides. (In eval mode without grad, bitsandbytes on an
AVX512-BF16 CPU repacks the weight for a bf16 inference kernel: different numerics; the 4-bit
linear benchmark reports that kernel separately, for information.)
"""

from __future__ import annotations

import torch
from torch import nn

from . import common as C


def quant_config(wl: C.Workload):
    import loraforge as lf

    return lf.QuantConfig(
        quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=wl.dtype, skip_modules=["lm_head"]
    )


def quantize_loraforge(model: nn.Module, wl: C.Workload) -> nn.Module:
    import loraforge as lf

    return lf.quantize(model, quant_config(wl))


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (NF4 + double quant, blocksize 64) holding ``linear``'s weight."""
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu"),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        blocksize=64,
    ).to(device)  # quantizes on the move to the device
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q


def load_bitsandbytes(model: nn.Module, wl: C.Workload, device: str) -> nn.Module:
    """``model`` saved and loaded back by transformers in 4-bit (NF4, double quant) via bitsandbytes."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=wl.dtype,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=bnb_config, dtype=wl.dtype, device_map=device
        )


def use_bnb_bytes(ours: nn.Module, theirs: nn.Module) -> int:
    """Give every loraforge 4-bit layer the packed bytes and quant state of bitsandbytes' layer of
    the same name (through the checkpoint format, as loading a bitsandbytes checkpoint does);
    returns how many layers. Needed on CUDA only: there bitsandbytes' quantize kernel breaks ties
    its own way, so the two would otherwise hold slightly different 4-bit models (on CPU the bytes
    are identical already, issue 3)."""
    import bitsandbytes as bnb

    from loraforge.quant.state import QuantState

    n = 0
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            tensors = module.weight.quant_state.as_dict(packed=True)
            state = QuantState.from_tensors(tensors, name)
            ours.get_submodule(name).load_quantized_(module.weight.data, state)
            n += 1
    return n


def fp32_reference(model: nn.Module) -> nn.Module:
    """A copy of a half-precision QLoRA model computing in fp32: the same 4-bit bytes and adapter,
    every other tensor and each 4-bit layer's compute dtype fp32 (for ``common.check_grads``)."""
    ref = C.clone(model).float()
    for m in ref.modules():
        if getattr(m, "compute_dtype", None) is not None:
            m.compute_dtype = torch.float32
    return ref


def dequantize_mismatches(ours: nn.Module, theirs: nn.Module) -> list[str]:
    """Names of the 4-bit layers whose weight bitsandbytes dequantizes differently from loraforge.

    The packed bytes and absmax values are identical (issue 3), but bitsandbytes 0.50's native CPU
    ``dequantize_4bit`` kernel gets rows whose length is not a multiple of the blocksize wrong
    (e.g. the 512 x 1376 ``down_proj`` of the reference workload: max error 0.055 against 0.011
    for a correct dequantization), so the peer then computes a slightly different model.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    bad = []
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w_theirs = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
            w_ours = ours.get_submodule(name).dequantize(w_theirs.dtype)  # (both round to it once)
            if not torch.equal(w_theirs, w_ours):
                bad.append(name)
    return bad


def qlora_pair(wl: C.Workload, device: str):
    """A loraforge QLoRA model and a PEFT + bitsandbytes one with identical 4-bit weights and
    identical (nonzero) adapters, both in train mode; and ``dequantize_mismatches``."""
    import peft

    import loraforge as lf

    base = C.llama(wl, device)
    theirs = load_bitsandbytes(base, wl, device)
    ours = quantize_loraforge(base, wl)
    if device.startswith("cuda"):
        use_bnb_bytes(ours, theirs)
    mismatches = dequantize_mismatches(ours, theirs)
    lf.inject(ours, C.lf_config(wl))
    C.randomize_lora_b(ours)
    theirs = peft.get_peft_model(theirs, C.peft_config(wl))
    if "bnb" not in type(theirs.base_model.model.model.layers[0].mlp.up_proj).__module__:
        raise AssertionError("PEFT did not use its bitsandbytes LoRA layer")
    C.copy_lora(ours, theirs)
    return ours.train(), theirs.train(), mismatches


def training_step(wl: C.Workload, device: str) -> list[C.Row]:
    """(2) One QLoRA training step (forward + backward), loraforge vs PEFT + bitsandbytes; the
    same losses and step definitions as the LoRA benchmark (``common.step_*``), no gradient
    checkpointing on either side. The first losses must agree (1e-4) and so must the adapter
    gradients (1e-3 relative) — unless bitsandbytes dequantizes some layers wrongly (see
    ``dequantize_mismatches``): then the peer does the same work on a slightly different model,
    only the loss is checked, to 1e-2, and the row says so."""
    ours, theirs, mismatches = qlora_pair(wl, device)
    ids = C.tokens(wl, device)
    low = wl.dtype != torch.float32 and not mismatches
    reference = C.fp32_grads(fp32_reference(ours), ids) if low else None
    # loraforge as its training loop runs it by default (train.compile: auto)
    steps = {"loraforge": C.step_loraforge(ours, ids, compile="auto"), "peft": C.step_peft(theirs, ids)}
    loss_tol = C.tol(wl.dtype, 1e-2 if mismatches else 1e-4)
    C.check_same_loss(steps["loraforge"](), steps["peft"](), "QLoRA training step", tol=loss_tol)
    if not mismatches:
        C.check_grads(
            C.lora_grads(ours), C.lora_grads(theirs, prefix="base_model.model."), wl.dtype,
            "QLoRA step vs PEFT + bitsandbytes", reference,
        )
    t = C.interleaved(steps, wl.warmup, wl.reps, device)
    tok = wl.tokens
    return [
        C.Row(
            "qlora_step",
            "QLoRA train step throughput",
            tok / t["loraforge"],
            tok / t["peft"],
            "tok/s",
            "PEFT + bitsandbytes",
            (">=", 2.0),
            f"step {t['loraforge']:.3f} s vs {t['peft']:.3f} s; samples {t.spread('loraforge', 'peft')}"
            + (
                f"; bitsandbytes' {'CUDA' if device.startswith('cuda') else 'CPU'} dequantize differs "
                f"from loraforge's on {len(mismatches)} layers (e.g. {mismatches[0].split('.')[-1]}), "
                "so its loss differs (checked to 1e-2 only)"
                if mismatches
                else ""
            ),
            t.best_ratio("loraforge", "peft", throughput=True),
        ),
    ]


def linear_shapes(wl: C.Workload) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of the 4-bit linear benchmark: the workload's MLP up-projection over
    the whole batch, and a 4096 x 4096 layer (7B-model width) over 256 tokens."""
    if wl.name == "tiny":
        return [(wl.tokens, wl.hidden, wl.intermediate)]
    shapes = [(wl.tokens, wl.hidden, wl.intermediate)]
    if not wl.quick:
        shapes.append((256, 4096, 4096))
    return shapes


def _forward(layer: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            return layer(x)

    return run


def _forward_backward(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    xg = x.detach().requires_grad_(True)

    def run():
        xg.grad = None
        layer(xg).backward(gy)
        return xg.grad

    return run


def linear4bit(wl: C.Workload, device: str) -> list[C.Row]:
    """(4) One 4-bit linear layer: forward (no grad) and forward + backward (gradient wrt the input
    only: the 4-bit weight is frozen), ``lf.quant.Linear4bit`` vs ``bnb.nn.Linear4bit``, both in
    train mode, where both dequantize the same NF4 weight to ``wl.dtype`` (outputs must agree to
    1e-4 in relative norm; the note gives each one's largest error against an fp64 product).
    For information, bitsandbytes' eval-mode CPU inference kernel too (see the module docstring)."""
    rows = []
    for tokens, d_in, d_out in linear_shapes(wl):
        torch.manual_seed(0)
        with torch.device(device):
            linear = nn.Linear(d_in, d_out, bias=False, dtype=wl.dtype)
        ours = quantize_loraforge(nn.Sequential(linear), wl)[0].train()
        theirs = bnb_linear4bit(linear, wl.dtype).train()
        if device.startswith("cuda"):
            use_bnb_bytes(nn.ModuleDict({"m": ours}), nn.ModuleDict({"m": theirs}))
        packed = bnb_linear4bit(linear, wl.dtype).eval()
        del linear
        x = torch.randn(tokens, d_in, device=device, dtype=wl.dtype)
        gy = torch.randn(tokens, d_out, device=device, dtype=wl.dtype)
        with torch.no_grad():
            a, b = ours(x), theirs(x)
            exact = x.double() @ ours.dequantize(torch.float32).double().t()
        if C.rel_err(a, b) > C.tol(wl.dtype, 1e-4):
            raise AssertionError(f"4-bit linear outputs differ by {float((a - b).abs().max()):.2e}")
        accuracy = (
            f"max |y - y_fp64|: loraforge {float((a.double() - exact).abs().max()):.1e}, "
            f"bnb {float((b.double() - exact).abs().max()):.1e}"
        )
        fns = {
            "ours_f": _forward(ours, x),
            "theirs_f": _forward(theirs, x),
            "packed_f": _forward(packed, x),
            "ours_fb": _forward_backward(ours, x, gy),
            "theirs_fb": _forward_backward(theirs, x, gy),
        }
        timings = C.interleaved(fns, wl.warmup, wl.reps, device)
        t = {k: v * 1e3 for k, v in timings.items()}
        best = timings.best_ratio
        shape = f"{tokens} tok x {d_in}->{d_out}"
        repacked = getattr(packed.weight.quant_state, "packing_format_for_cpu", False)
        eval_note = "bnb repacks for a bf16 AVX512 kernel in eval mode (not fp32-exact)" if repacked else ""
        peer = "bnb Linear4bit"
        rows += [
            C.Row("linear4bit", f"4-bit linear forward ({shape})", t["ours_f"], t["theirs_f"], "ms", peer,
                  note=accuracy, best_ratio=best("ours_f", "theirs_f")),
            C.Row("linear4bit", f"4-bit linear forward vs bnb eval kernel ({shape}, info)", t["ours_f"],
                  t["packed_f"], "ms", peer + " eval", note=eval_note, best_ratio=best("ours_f", "packed_f")),
            C.Row("linear4bit", f"4-bit linear fwd+bwd ({shape})", t["ours_fb"], t["theirs_fb"], "ms", peer,
                  best_ratio=best("ours_fb", "theirs_fb")),
        ]  # fmt: skip
    return rows
