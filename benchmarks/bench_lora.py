"""LoRA benchmarks: training step, inference, mixed-adapter batch, adapter switching.

Every function takes a ``Workload`` and a device and returns table rows (``common.Row``); the
contenders of one row are always timed interleaved in this process (``common.interleaved``).
"""

from __future__ import annotations

import tempfile
import time

import torch

from . import common as C


def _pair(wl: C.Workload, device: str, adapters: tuple[str, ...] = ("default",)):
    """The base model, a loraforge copy and a PEFT copy with identical (nonzero) adapters."""
    import peft

    import loraforge as lf

    base = C.llama(wl, device)
    ours, theirs = C.clone(base), C.clone(base)
    for i, name in enumerate(adapters):
        if i == 0:
            lf.inject(ours, C.lf_config(wl), adapter=name)
        else:
            lf.add_adapter(ours, name, C.lf_config(wl))
    C.randomize_lora_b(ours)
    theirs = peft.get_peft_model(theirs, C.peft_config(wl), adapter_name=adapters[0])
    for name in adapters[1:]:
        theirs.add_adapter(name, C.peft_config(wl))
    C.copy_lora(ours, theirs)
    if len(adapters) > 1:
        lf.set_adapter(ours, adapters[0])
        theirs.set_adapter(adapters[0])
    # Eval mode everywhere (PEFT switches to train mode): dropout is 0 anyway, and PEFT refuses
    # ``adapter_names`` in train mode. Gradients flow the same in either mode.
    return base.eval(), ours.eval(), theirs.eval()


def training_step(wl: C.Workload, device: str) -> list[C.Row]:
    """(1) One LoRA training step (forward + backward) vs PEFT, and vs the frozen floor.

    loraforge: ``CausalLMLoss`` / n_tokens, backward (``common.step_loraforge``). PEFT:
    ``model(input_ids, labels=ids).loss.backward()``. Floor: the base model frozen, gradient
    flowing from the embeddings' output (``common.frozen_floor``), same loss as loraforge. The
    loss of the first step must agree between loraforge and PEFT (1e-4) and so must the adapter
    gradients (1e-3 relative), else the benchmark fails instead of timing different work.
    """
    from loraforge.training import fast

    base, ours, theirs = _pair(wl, device)
    floor = C.frozen_floor(base)
    ids = C.tokens(wl, device)
    reference = C.fp32_grads(C.clone(ours).float(), ids) if wl.dtype != torch.float32 else None
    steps = {  # loraforge and the floor as the training loop runs them (train.compile: auto)
        "loraforge": C.step_loraforge(ours, ids, compile="auto"),
        "peft": C.step_peft(theirs, ids),
        "floor": C.step_loraforge(floor, ids, compile="auto"),
    }
    compiled = fast.should_compile("auto", device)[0]
    t0 = time.perf_counter()
    first = steps["loraforge"]()  # (compiles, where the loop would)
    first_s = time.perf_counter() - t0
    peer_loss = steps["peft"]()
    C.check_same_loss(first, peer_loss, "LoRA training step", tol=C.tol(wl.dtype, 1e-4))
    grads_note = C.check_grads(
        C.lora_grads(ours), C.lora_grads(theirs, prefix="base_model.model."), wl.dtype, "LoRA step vs PEFT",
        reference,
    )
    how = f"decoder layers torch.compile'd (first step {first_s:.1f} s); " if compiled else ""
    if compiled:  # PEFT's model with the same per-layer torch.compile, for information
        peft_compiled = C.clone(theirs)
        fast.compile_layers(peft_compiled)
        steps["peft_compiled"] = C.step_peft(peft_compiled, ids)
        loss_c = steps["peft_compiled"]()
        C.check_same_loss(loss_c, peer_loss, "compiled PEFT step", tol=C.tol(wl.dtype, 1e-4))
    checked = f"checked: loss {first:.5f} vs {peer_loss:.5f}, {grads_note}; "
    t = C.interleaved(steps, wl.warmup, wl.reps, device)
    tok = wl.tokens
    extra = []
    if compiled:
        extra.append(C.Row(
            "lora_step", "LoRA train step throughput vs PEFT with the same torch.compile (info)",
            tok / t["loraforge"], tok / t["peft_compiled"], "tok/s", "PEFT, decoder layers compiled", None,
            f"samples {t.spread('peft_compiled')}",
            t.best_ratio("loraforge", "peft_compiled", throughput=True),
        ))  # fmt: skip
    return [
        C.Row(
            "lora_step",
            "LoRA train step throughput",
            tok / t["loraforge"],
            tok / t["peft"],
            "tok/s",
            "PEFT",
            (">=", 2.0),
            f"{how}step {t['loraforge']:.3f} s vs {t['peft']:.3f} s; {checked}"
            f"samples {t.spread('loraforge', 'peft', 'floor')}",
            t.best_ratio("loraforge", "peft", throughput=True),
        ),
        C.Row(
            "lora_step",
            "LoRA train step vs frozen fwd+bwd floor",
            t["loraforge"],
            t["floor"],
            "s",
            "floor",
            ("<=", 1.2),
            "floor: frozen base, grad from embedding output, same loss",
            t.best_ratio("loraforge", "floor"),
        ),
        C.Row(
            "lora_step",
            "PEFT train step vs floor (info)",
            t["peft"],
            t["floor"],
            "s",
            "floor",
            note="PEFT's own overhead over the floor",
            best_ratio=t.best_ratio("peft", "floor"),
        ),
    ] + extra


def inference(wl: C.Workload, device: str) -> list[C.Row]:
    """(5) Forward latency (no grad, full logits) of: the base model; loraforge with the adapter
    merged (must be ~1.0x base: the wrappers only add a Python call); loraforge and PEFT unmerged.
    Twice the usual repetitions: the 1.02 bound needs a steadier median than the others."""
    import loraforge as lf

    base, ours, theirs = _pair(wl, device)
    merged = C.clone(ours)
    lf.merge(merged, "default")
    ids = C.tokens(wl, device)
    with torch.no_grad():
        ref, got = base(input_ids=ids).logits, merged(input_ids=ids).logits
        lf_out, peft_out = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    if not C.close(lf_out, peft_out, 1e-4) or not C.close(got, lf_out, 1e-3):
        raise AssertionError(
            f"merged / unmerged / PEFT logits disagree: |unmerged - PEFT| / |PEFT| = "
            f"{C.rel_err(lf_out, peft_out):.2e}, "
            f"|merged - unmerged| / |unmerged| = {C.rel_err(got, lf_out):.2e}"
        )
    del ref, got, lf_out, peft_out

    def fwd(m):
        def run():
            with torch.no_grad():
                return m(input_ids=ids, use_cache=False).logits

        return run

    t = C.interleaved(
        {"base": fwd(base), "merged": fwd(merged), "unmerged": fwd(ours), "peft": fwd(theirs)},
        wl.warmup,
        2 * wl.reps,
        device,
    )
    return [
        C.Row(
            "inference",
            "inference: loraforge merged vs base model",
            t["merged"] * 1e3,
            t["base"] * 1e3,
            "ms",
            "base model",
            ("<=", 1.02),
            f"batch {wl.batch} x {wl.seq}; "
            f"samples {t.spread('merged', 'base', 'unmerged', 'peft', scale=1e3, unit='ms')}",
            t.best_ratio("merged", "base"),
        ),
        C.Row(
            "inference",
            "inference: loraforge unmerged vs base (info)",
            t["unmerged"] * 1e3,
            t["base"] * 1e3,
            "ms",
            "base model",
            note="unmerged LoRA overhead",
            best_ratio=t.best_ratio("unmerged", "base"),
        ),
        C.Row(
            "inference",
            "inference: unmerged, loraforge vs PEFT (info)",
            t["unmerged"] * 1e3,
            t["peft"] * 1e3,
            "ms",
            "PEFT",
            best_ratio=t.best_ratio("unmerged", "peft"),
        ),
    ]


def mixed_batch(wl: C.Workload, device: str) -> list[C.Row]:
    """(6) Forward (no grad) of a batch of 8 rows x ``seq`` tokens, where every row uses a different
    adapter: loraforge ``lf.adapter_batch`` vs the same batch through one adapter (loraforge,
    unmerged) vs PEFT's ``model(..., adapter_names=[...])``. Figures are tokens/s."""
    import loraforge as lf

    names = tuple(f"task{i}" for i in range(8))
    _, ours, theirs = _pair(wl, device, adapters=names)
    del _
    # Different adapters must differ: give each its own B (same in both libraries).
    for i, n in enumerate(names):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in sorted(ours.named_parameters()):
                if f"lora_B.{n}." in k:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    C.copy_lora(ours, theirs)
    ids = C.tokens(wl, device, batch=len(names))
    rows = list(names)
    with torch.no_grad(), lf.adapter_batch(ours, rows):
        a = ours(input_ids=ids).logits
    with torch.no_grad():
        b = theirs(input_ids=ids, adapter_names=rows).logits
    if not C.close(a, b, 1e-4):
        diff = C.rel_err(a, b)
        raise AssertionError(f"mixed-batch logits differ from PEFT's by {diff:.2e} (relative norm)")
    del a, b

    def ours_mixed():
        with torch.no_grad(), lf.adapter_batch(ours, rows):
            return ours(input_ids=ids, use_cache=False).logits

    def ours_single():
        with torch.no_grad():
            return ours(input_ids=ids, use_cache=False).logits

    def peft_mixed():
        with torch.no_grad():
            return theirs(input_ids=ids, adapter_names=rows, use_cache=False).logits

    t = C.interleaved(
        {"mixed": ours_mixed, "single": ours_single, "peft": peft_mixed}, wl.warmup, wl.reps, device
    )
    tok = ids.numel()
    return [
        C.Row(
            "mixed",
            "8-adapter mixed batch vs one adapter",
            tok / t["mixed"],
            tok / t["single"],
            "tok/s",
            "loraforge, 1 adapter",
            (">=", 0.8),
            f"batch 8 x {wl.seq}, forward only; samples {t.spread('mixed', 'single', 'peft')}",
            t.best_ratio("mixed", "single", throughput=True),
        ),
        C.Row(
            "mixed",
            "8-adapter mixed batch vs PEFT adapter_names",
            tok / t["mixed"],
            tok / t["peft"],
            "tok/s",
            "PEFT",
            (">=", 2.0),
            best_ratio=t.best_ratio("mixed", "peft", throughput=True),
        ),
    ]


def adapter_switch(wl: C.Workload, device: str) -> list[C.Row]:
    """(7) Switching the served adapter. By merge: unmerge the current adapter and merge the
    other (loraforge ``lf.unmerge`` + ``lf.merge``; PEFT ``unmerge_adapter``, ``set_adapter``,
    ``merge_adapter``). From disk: load a saved adapter into the model (loraforge
    ``lf.load_adapter``; PEFT ``load_adapter``), files in the OS page cache; the adapter is
    deleted again between calls (not timed)."""
    import loraforge as lf

    _, ours, theirs = _pair(wl, device, adapters=("first", "second"))
    del _
    lf.merge(ours, "first")
    theirs.merge_adapter()
    state = {"ours": "first", "theirs": "first"}
    other = {"first": "second", "second": "first"}

    def switch_ours():
        nxt = other[state["ours"]]
        lf.unmerge(ours)
        lf.merge(ours, nxt)
        state["ours"] = nxt

    def switch_theirs():
        nxt = other[state["theirs"]]
        theirs.unmerge_adapter()
        theirs.set_adapter(nxt)
        theirs.merge_adapter()
        state["theirs"] = nxt

    t_switch = C.interleaved({"ours": switch_ours, "theirs": switch_theirs}, wl.warmup, wl.reps, device)
    lf.unmerge(ours)
    theirs.unmerge_adapter()

    with tempfile.TemporaryDirectory() as tmp:
        lf.save_adapter(ours, f"{tmp}/ours", adapter="second")
        theirs.save_pretrained(f"{tmp}/theirs", selected_adapters=["second"])
        peft_dir = f"{tmp}/theirs/second"

        def load_ours():
            lf.load_adapter(ours, f"{tmp}/ours", adapter="loaded")
            C.sync(device)

        def load_theirs():
            theirs.load_adapter(peft_dir, adapter_name="loaded")
            C.sync(device)

        t_load = _timed_with_cleanup(
            {"ours": load_ours, "theirs": load_theirs},
            {
                "ours": lambda: lf.delete_adapter(ours, "loaded"),
                "theirs": lambda: theirs.delete_adapter("loaded"),
            },
            wl.warmup,
            wl.reps,
        )
    return [
        C.Row(
            "switch",
            "adapter switch by unmerge+merge",
            t_switch["ours"] * 1e3,
            t_switch["theirs"] * 1e3,
            "ms",
            "PEFT",
            note="all-linear adapter, every layer",
            best_ratio=t_switch.best_ratio("ours", "theirs"),
        ),
        C.Row(
            "switch",
            "adapter load from disk",
            t_load["ours"] * 1e3,
            t_load["theirs"] * 1e3,
            "ms",
            "PEFT",
            note=f"loraforge: switch {t_switch['ours'] * 1e3:.0f} ms vs load {t_load['ours'] * 1e3:.0f} ms",
            best_ratio=t_load.best_ratio("ours", "theirs"),
        ),
    ]


def _timed_with_cleanup(fns, cleanups, warmup: int, reps: int) -> C.Timings:
    """Like ``common.interleaved`` but runs an untimed cleanup after each call."""
    import time

    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
            cleanups[n]()
    times = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            cleanups[n]()
    return C.Timings(times)
