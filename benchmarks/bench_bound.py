"""How fast could any exact LoRA step (or 8-adapter mixed batch) be here? A lower bound for issue 6.

A LoRA training step must do the matrix products of the frozen model's forward and of its
activation gradients (every layer, and the LM head's (tokens x vocab) logits both ways), plus the
small LoRA products. Whatever the implementation, those FLOPs take at least
``FLOPs / (the best GEMM rate this machine reaches)``. The FLOPs are counted, not estimated, by
``torch.utils.flop_counter.FlopCounterMode`` on PEFT's own step (matmuls and, where the counter
knows the op, attention); the GEMM rate is the best of square fp32 matmuls and of the step's two
largest shapes, timed here with the workload's thread count. The row's ratio, bound / PEFT's time,
is the least time any exact implementation could take relative to PEFT: ``1 / ratio`` is the
largest possible speed-up over PEFT, all elementwise work, attention softmax and the loss's
exponentials counted as free.
"""

from __future__ import annotations

import time

import torch

from . import common as C


def best_gemm_rate(wl: C.Workload, device: str, reps: int = 5) -> tuple[float, str]:
    """(FLOP/s, shape) of the fastest matmul among square ones and the step's big shapes."""
    dtype = wl.dtype
    shapes = [(n, n, n) for n in (1024, 2048)] + [
        (wl.tokens, wl.hidden, wl.vocab),  # the LM head's logits
        (wl.tokens, wl.hidden, wl.intermediate),  # gate / up projections
    ]
    best = (0.0, "")
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            C.sync(device)
            t0 = time.perf_counter()
            a @ b
            C.sync(device)
            times.append(time.perf_counter() - t0)
        rate = 2 * m * k * n / min(times)
        if rate > best[0]:
            best = (rate, f"{m}x{k} @ {k}x{n}")
    return best


def step_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _row(name: str, what: str, flops: int, peer_s: float, rate: float, shape: str) -> C.Row:
    bound = flops / rate
    note = (
        f"{flops / 1e9:.1f} GFLOP counted in PEFT's {what}; best GEMM {rate / 1e9:.1f} GFLOP/s ({shape}); "
        f"so no exact implementation can be more than {peer_s / bound:.2f}x faster than PEFT here"
    )
    return C.Row("bound", name, bound, peer_s, "s", f"PEFT {what}", None, note=note)


def lower_bound(wl: C.Workload, device: str) -> list[C.Row]:
    """Two rows: the LoRA training step (``lora_step``'s 2x target) and the 8-adapter mixed
    batch forward (``mixed``'s 2x-PEFT target), each against PEFT's time for the same work."""
    import peft

    rate, shape = best_gemm_rate(wl, device)
    model = peft.get_peft_model(C.llama(wl, device), C.peft_config(wl)).train()
    step = C.step_peft(model, C.tokens(wl, device))
    flops = step_flops(step)
    t = C.interleaved({"peft": step}, wl.warmup, wl.reps, device)
    rows = [_row("LoRA step lower bound: counted FLOPs / best GEMM rate (info)", "step", flops,
                 t["peft"], rate, shape)]
    del model, step

    names = [f"task{i}" for i in range(8)]  # as benchmarks.bench_lora.mixed_batch
    model = peft.get_peft_model(C.llama(wl, device), C.peft_config(wl), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, C.peft_config(wl))
    model.eval()
    ids = C.tokens(wl, device, batch=len(names))

    def mixed():
        with torch.no_grad():
            return model(input_ids=ids, adapter_names=names, use_cache=False).logits

    flops = step_flops(mixed)
    t = C.interleaved({"peft": mixed}, wl.warmup, wl.reps, device)
    rows.append(_row("8-adapter mixed batch lower bound: counted FLOPs / best GEMM rate (info)",
                     "mixed batch", flops, t["peft"], rate, shape))
    return rows
