"""DoRA benchmark: a DoRA training step against a LoRA step, in loraforge and in PEFT.

Four contenders on one ``Workload``, timed interleaved (``common.interleaved``): loraforge LoRA,
loraforge DoRA, PEFT LoRA, PEFT DoRA, each a forward + backward as ``bench_lora.training_step``
times it (loraforge: ``CausalLMLoss`` / n_tokens, with the training loop's fast forwards; PEFT:
``model(input_ids, labels=ids).loss``). The two DoRA models hold the same factors and
magnitudes; their first losses must agree (1e-4) and so must their adapter gradients,
magnitudes included (1e-3 relative), else the benchmark fails instead of timing different work.
Issue 18's targets: loraforge's DoRA step at most 1.15x its LoRA step, and faster than PEFT's
DoRA step (PEFT's own DoRA costs ~1.26x its LoRA step).
"""

from __future__ import annotations

import dataclasses

import torch

from . import common as C


def _models(wl: C.Workload, device: str):
    """loraforge LoRA, loraforge DoRA, PEFT LoRA, PEFT DoRA on one base, with the same nonzero
    factors everywhere (and the same magnitudes on the two DoRA models)."""
    import peft

    import loraforge as lf

    base = C.llama(wl, device)
    lora, dora = C.clone(base), C.clone(base)
    lf.inject(lora, C.lf_config(wl))
    C.randomize_lora_b(lora)
    lf.inject(dora, dataclasses.replace(C.lf_config(wl), use_dora=True))
    C.randomize_lora_b(dora)  # (m stays ‖W0‖: f = ‖W0‖ / ‖W0 + ΔW‖ ≠ 1, DoRA's work is all done)
    peft_lora = peft.get_peft_model(C.clone(base), C.peft_config(wl))
    peft_cfg = C.peft_config(wl)
    peft_cfg.use_dora = True
    peft_dora = peft.get_peft_model(C.clone(base), peft_cfg)
    C.copy_lora(lora, peft_lora)
    C.copy_lora(dora, peft_dora)
    del base
    return lora.eval(), dora.eval(), peft_lora.eval(), peft_dora.eval()


def training_step(wl: C.Workload, device: str) -> list[C.Row]:
    """A DoRA step vs a LoRA step (loraforge and PEFT), and loraforge's DoRA vs PEFT's."""
    lora, dora, peft_lora, peft_dora = _models(wl, device)
    ids = C.tokens(wl, device)
    reference = C.fp32_grads(C.clone(dora).float(), ids) if wl.dtype != torch.float32 else None
    steps = {
        "lora": C.step_loraforge(lora, ids, compile="auto"),
        "dora": C.step_loraforge(dora, ids, compile="auto"),
        "peft_lora": C.step_peft(peft_lora, ids),
        "peft_dora": C.step_peft(peft_dora, ids),
    }
    first, peer = steps["dora"](), steps["peft_dora"]()
    C.check_same_loss(first, peer, "DoRA training step", tol=C.tol(wl.dtype, 1e-4))
    grads = C.lora_grads(dora)
    if not any("lora_magnitude_vector" in k for k in grads):
        raise AssertionError("DoRA step: the magnitudes got no gradient")
    note = C.check_grads(
        grads, C.lora_grads(peft_dora, prefix="base_model.model."), wl.dtype, "DoRA step vs PEFT", reference
    )
    t = C.interleaved(steps, wl.warmup, wl.reps, device)
    tok = wl.tokens
    checked = f"checked: loss {first:.5f} vs {peer:.5f}, {note}"
    return [
        C.Row(
            "dora_step", "DoRA train step vs loraforge's LoRA step", t["dora"], t["lora"], "s",
            "loraforge LoRA", ("<=", 1.15),
            f"{checked}; samples {t.spread('dora', 'lora', 'peft_dora', 'peft_lora')}",
            t.best_ratio("dora", "lora"),
        ),
        C.Row(
            "dora_step", "DoRA train step throughput vs PEFT DoRA", tok / t["dora"], tok / t["peft_dora"],
            "tok/s", "PEFT DoRA", (">=", 1.0), best_ratio=t.best_ratio("dora", "peft_dora", throughput=True),
        ),
        C.Row(
            "dora_step", "PEFT DoRA step vs PEFT LoRA step (info)", t["peft_dora"], t["peft_lora"], "s",
            "PEFT LoRA", note="PEFT's own DoRA overhead", best_ratio=t.best_ratio("peft_dora", "peft_lora"),
        ),
    ]  # fmt: skip
