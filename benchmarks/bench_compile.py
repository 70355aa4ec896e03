"""Does ``torch.compile`` pay for a training step here? (issue 6's compile lever, measured.)

Two copies of the LoRA model (same weights and adapters): one eager, one with every decoder layer
compiled (``layer.compile()``: TorchInductor; loraforge's fused LoRA function and fast forwards
are custom autograd functions, which Dynamo traces through or breaks around). The first compiled
step, which compiles, is timed on its own and reported as the compile time; then both copies are
timed interleaved, after checking that they give the same loss and adapter gradients. The same
again for the QLoRA model (4-bit base; its dequantization is one opaque custom operator inside the
compiled graphs). The rows are informational: they are what ``train.compile: auto`` is decided
from (see ``loraforge.training.fast.should_compile`` and BENCHMARKS.md).
"""

from __future__ import annotations

import time

import torch

from . import common as C


def _compare(kind: str, eager: torch.nn.Module, reference, wl: C.Workload, device: str) -> C.Row:
    compiled = C.clone(eager)
    ids = C.tokens(wl, device)
    reference = C.fp32_grads(reference, ids) if reference is not None else None
    # eager with the fast forwards; compiled without them, as the training loop runs each
    step_eager, step_compiled = C.step_loraforge(eager, ids), C.step_loraforge(compiled, ids, compile=True)

    C.sync(device)
    t0 = time.perf_counter()
    loss_compiled = step_compiled()  # compiles
    C.sync(device)
    first = time.perf_counter() - t0
    C.check_same_loss(loss_compiled, step_eager(), f"torch.compile'd {kind} step", tol=C.tol(wl.dtype, 1e-4))
    grads_note = C.check_grads(
        C.lora_grads(compiled),
        C.lora_grads(eager),
        wl.dtype,
        f"torch.compile'd {kind} step vs eager",
        reference,
    )
    t = C.interleaved({"compiled": step_compiled, "eager": step_eager}, wl.warmup, wl.reps, device)
    return C.Row(
        "compile",
        f"{kind} step, torch.compile'd decoder layers vs eager (info)",
        t["compiled"],
        t["eager"],
        "s",
        "loraforge eager",
        None,
        f"first compiled step (compiling) {first:.1f} s; {grads_note}; "
        f"samples {t.spread('compiled', 'eager')}",
        t.best_ratio("compiled", "eager"),
    )


def compiled_step(wl: C.Workload, device: str) -> list[C.Row]:
    import loraforge as lf

    from . import bench_qlora

    low = wl.dtype != torch.float32
    eager = lf.inject(C.llama(wl, device), C.lf_config(wl)).train()
    C.randomize_lora_b(eager)
    rows = [_compare("LoRA", eager, C.clone(eager).float() if low else None, wl, device)]
    del eager
    eager = lf.inject(bench_qlora.quantize_loraforge(C.llama(wl, device), wl), C.lf_config(wl)).train()
    C.randomize_lora_b(eager)
    rows.append(_compare("QLoRA", eager, bench_qlora.fp32_reference(eager) if low else None, wl, device))
    return rows
