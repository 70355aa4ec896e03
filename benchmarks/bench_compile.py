"""Does ``torch.compile`` pay for a LoRA training step here? (issue 6's compile lever, measured.)

Two copies of the LoRA model (same weights and adapters): one eager, one with every decoder layer
compiled (``layer.compile()``: TorchInductor; loraforge's fused LoRA function and fast forwards
are custom autograd functions, which Dynamo traces through or breaks around). The first compiled
step, which compiles, is timed on its own and reported as the compile time; then both copies are
timed interleaved, after checking that they give the same loss. The row is informational: compile
is not on by default, because on this CPU it does not pay (see BENCHMARKS.md).
"""

from __future__ import annotations

import time

import torch

from . import common as C


def compiled_step(wl: C.Workload, device: str) -> list[C.Row]:
    import loraforge as lf

    eager = lf.inject(C.llama(wl, device), C.lf_config(wl)).train()
    C.randomize_lora_b(eager)
    compiled = C.clone(eager)
    ids = C.tokens(wl, device)
    reference = C.fp32_grads(C.clone(eager).float(), ids) if wl.dtype != torch.float32 else None
    # eager with the fast forwards; compiled without them, as the training loop runs each
    step_eager, step_compiled = C.step_loraforge(eager, ids), C.step_loraforge(compiled, ids, compile=True)

    C.sync(device)
    t0 = time.perf_counter()
    loss_compiled = step_compiled()  # compiles
    C.sync(device)
    first = time.perf_counter() - t0
    C.check_same_loss(loss_compiled, step_eager(), "torch.compile'd LoRA step", tol=C.tol(wl.dtype, 1e-4))
    grads_note = C.check_grads(
        C.lora_grads(compiled), C.lora_grads(eager), wl.dtype, "torch.compile'd LoRA step vs eager", reference
    )
    t = C.interleaved({"compiled": step_compiled, "eager": step_eager}, wl.warmup, wl.reps, device)
    return [
        C.Row(
            "compile",
            "LoRA step, torch.compile'd decoder layers vs eager (info)",
            t["compiled"],
            t["eager"],
            "s",
            "loraforge eager",
            None,
            f"first compiled step (compiling) {first:.1f} s; {grads_note}; "
            f"samples {t.spread('compiled', 'eager')}",
            t.best_ratio("compiled", "eager"),
        )
    ]
