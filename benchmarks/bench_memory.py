"""(8) Peak memory of a training step, LoRA and QLoRA, loraforge vs PEFT (+ bitsandbytes).

Each contender runs in its own fresh process (``common.run_isolated``): build the model, release
freed memory to the OS, reset the peak counter, run two training steps (the first allocates the
gradients), read the peak. The figure is the peak minus the process's memory before the model
was built, so it counts model weights + adapter gradients + activations + temporaries and not
the ~0.5 GB that importing torch / transformers / PEFT costs every contender alike:

* CPU: ``VmHWM`` (peak resident set) minus ``VmRSS`` after the imports, in MB.
* CUDA: ``torch.cuda.max_memory_allocated()``, in MB.

The steps are those of the timing benchmarks (``common.step_loraforge`` / ``common.step_peft``),
no gradient checkpointing on either side.
"""

from __future__ import annotations

import torch

from . import common as C

KINDS = ("lora_loraforge", "lora_peft", "qlora_loraforge", "qlora_peft", "lora_loraforge_ckpt")


def _checkpointed(model):
    from loraforge.training.modeling import enable_activation_checkpointing

    enable_activation_checkpointing(model)  # what `train.gradient_checkpointing: true` does
    return model


def _build(kind: str, wl: C.Workload, device: str):
    import peft

    import loraforge as lf

    from . import bench_qlora as Q

    base = C.llama(wl, device)
    ids = C.tokens(wl, device)
    if kind == "lora_loraforge":  # as the training loop runs it (train.compile: auto)
        return C.step_loraforge(lf.inject(base, C.lf_config(wl)).train(), ids, compile="auto")
    if kind == "lora_loraforge_ckpt":
        return C.step_loraforge(_checkpointed(lf.inject(base, C.lf_config(wl)).train()), ids)
    if kind == "lora_peft":
        return C.step_peft(peft.get_peft_model(base, C.peft_config(wl)).train(), ids)
    if kind == "qlora_loraforge":
        model = lf.inject(Q.quantize_loraforge(base, wl), C.lf_config(wl))
        return C.step_loraforge(model.train(), ids)
    if kind == "qlora_peft":
        model = Q.load_bitsandbytes(base, wl, device)
        del base
        return C.step_peft(peft.get_peft_model(model, C.peft_config(wl)).train(), ids)
    raise ValueError(kind)


def measure(kind: str, wl: C.Workload, device: str) -> dict[str, float]:
    """Runs in a fresh process: {"model_mb": after building, "peak_mb": peak over two steps}.

    On CUDA one step runs before the peak is reset: it compiles (where the loop would) and
    creates the libraries' workspaces, which are not the step's memory."""
    C.apply_threads(wl)
    cuda = device.startswith("cuda")
    C.release_free_memory()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else C.rss_mb()
    step = _build(kind, wl, device)
    C.release_free_memory()
    C.sync(device)
    if cuda:
        model_mb = torch.cuda.memory_allocated() / 2**20
        step()
        C.sync(device)
        torch.cuda.reset_peak_memory_stats()
    else:
        model_mb = C.rss_mb() - before
        C.reset_peak_rss()
    step()
    step()
    C.sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else C.peak_rss_mb() - before
    return {"model_mb": model_mb, "peak_mb": peak}


def peak_memory(wl: C.Workload, device: str) -> list[C.Row]:
    rows, errors = [], []
    for what, label, peer in (("lora", "LoRA", "PEFT"), ("qlora", "QLoRA", "PEFT + bitsandbytes")):
        try:
            ours = C.run_isolated(measure, f"{what}_loraforge", wl, device)
            theirs = C.run_isolated(measure, f"{what}_peft", wl, device)
        except Exception as e:  # keep the LoRA figures when QLoRA fails, and vice versa
            errors.append(f"{label}: {type(e).__name__}: {e}")
            continue
        rows.append(
            C.Row(
                "memory",
                f"{label} train step peak memory",
                ours["peak_mb"],
                theirs["peak_mb"],
                "MB",
                peer,
                ("<=", 0.6),
                f"model alone {ours['model_mb']:.0f} vs {theirs['model_mb']:.0f} MB",
            )
        )
    if errors:
        raise C.PartialFailure(rows, "; ".join(errors))
    return rows


def checkpointing(wl: C.Workload, device: str) -> list[C.Row]:
    """Activation checkpointing's trade-off for the LoRA step (``train.gradient_checkpointing``):
    peak memory with and without (fresh processes, as above), and step time with and without
    (one process, interleaved, same loss checked)."""
    import loraforge as lf

    with_ckpt = C.run_isolated(measure, "lora_loraforge_ckpt", wl, device)
    without = C.run_isolated(measure, "lora_loraforge", wl, device)
    plain = lf.inject(C.llama(wl, device), C.lf_config(wl)).train()
    C.randomize_lora_b(plain)
    ckpt = _checkpointed(C.clone(plain))
    ids = C.tokens(wl, device)
    steps = {"ckpt": C.step_loraforge(ckpt, ids), "plain": C.step_loraforge(plain, ids)}
    C.check_same_loss(steps["ckpt"](), steps["plain"](), "checkpointed LoRA step", tol=C.tol(wl.dtype, 1e-4))
    t = C.interleaved(steps, wl.warmup, wl.reps, device)
    return [
        C.Row("checkpointing", "LoRA step peak memory, activation checkpointing vs none (info)",
              with_ckpt["peak_mb"], without["peak_mb"], "MB", "loraforge, no checkpointing", None),
        C.Row("checkpointing", "LoRA step time, activation checkpointing vs none (info)", t["ckpt"],
              t["plain"], "s", "loraforge, no checkpointing", None,
              f"samples {t.spread('ckpt', 'plain')}", t.best_ratio("ckpt", "plain")),
    ]

