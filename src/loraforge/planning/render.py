"""``Plan.render()``: the text ``loraforge plan`` prints."""

from __future__ import annotations

from . import fmt_bytes, fmt_flops, fmt_seconds


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def _header(p) -> list[str]:
    cfg, t = p.config, p.config.train
    mc = p.model_config
    total, trainable = p.params["total"], p.params["trainable"]
    share = f"{trainable / 1e6:,.1f} M trainable ({100 * trainable / total:.2f}%)" if trainable else ""
    where = f"{p.world_size} x {p.device}" + (f" ({t.distributed})" if p.world_size > 1 else "")
    if t.distributed == "fsdp" and p.world_size == 1:
        where += " (fsdp)"
    layers = mc.get("num_hidden_layers", mc.get("n_layer", "?"))
    attn = cfg.model.attn_implementation or "sdpa"
    return [
        f"plan: {cfg.method} of {cfg.model.path} ({layers} layers, {_count(total)} parameters"
        + (f"; {share}" if share else "") + f") on {where}",
        f"  micro-batch {t.batch_size} x {cfg.data.max_length} tokens, grad_accum {t.grad_accum}, "
        f"{cfg.model.dtype} weights, {attn} attention, optimizer {t.optimizer}, activation checkpointing "
        + ("on" if t.gradient_checkpointing else "off"),
    ]


def _memory(p) -> list[str]:
    m = p.memory
    lines = ["", "memory per device" + (f" (each of {p.world_size} processes)" if p.world_size > 1 else "")]
    width = max(len(i.name) for i in m.items)
    for it in m.items:
        mark = " " if it.name in m.peak_items else "*"
        lines.append(f"  {it.name:<{width}} {fmt_bytes(it.bytes):>12}{mark} {it.detail}")
    lines.append(f"  {'peak':<{width}} {fmt_bytes(m.peak_bytes):>12}  at the {m.peak_phase}; "
                 + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m.phases.items()))  # fmt: skip
    if any(it.name not in m.peak_items for it in m.items):
        lines.append("  (* not held at the peak's moment)")
    lines += [f"  note: {n}" for n in m.notes]
    return lines


def _compute(p) -> list[str]:
    f = p.flops
    total = f.total
    top = sorted(f.terms.items(), key=lambda kv: -kv[1])
    split = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top if v / total >= 0.005)
    per_token = total / f.tokens
    tok_s = f.tokens * p.world_size / p.seconds_per_step
    return [
        "",
        f"compute per optimizer step (each process): {fmt_flops(total)} for {f.tokens:,} tokens "
        f"({fmt_flops(per_token)} per token)",
        f"  {split}",
        f"  time per step {fmt_seconds(p.seconds_per_step)} at {p.gemm.flops_per_s / 1e12:,.3g} TFLOP/s "
        f"({p.gemm.source}); {tok_s:,.0f} tokens/s over {p.world_size} process(es)",
        "  (the matmuls alone, as torch's FlopCounterMode counts them, every row max_length long: a floor;"
        " norms, softmax and the loss's exponentials add to it)",
    ]


def _fit(p) -> list[str]:
    if p.budget_bytes is None:
        return []
    need, have = p.memory.peak_bytes, p.budget_bytes
    if p.fits:
        return ["", f"fits in {fmt_bytes(have)} per device: peak {fmt_bytes(need)}, "
                    f"{fmt_bytes(have - need)} to spare"]  # fmt: skip
    lines = ["", f"does NOT fit in {fmt_bytes(have)} per device: peak {fmt_bytes(need)}, "
                 f"{fmt_bytes(need - have)} over"]  # fmt: skip
    if not p.suggestions:
        lines.append("  no change the planner knows makes it fit")
        return lines
    if len(p.suggestions) == 1 and " + " in p.suggestions[0].change:
        lines.append("  no single change fits; the cheapest combination:" if p.suggestions[0].fits
                     else "  even all the changes together do not fit; the closest:")  # fmt: skip
    else:
        lines.append("  changes that make it fit, cheapest first:")
    for i, s in enumerate(p.suggestions, 1):
        status = "fits" if s.fits else "does not fit"
        lines.append(f"  {i}. {s.change}: peak {fmt_bytes(s.peak_bytes)} ({status}), "
                     f"{fmt_seconds(s.seconds_per_step)} per step")  # fmt: skip
        lines.append(f"     cost: {s.cost}")
        run = " ".join(s.overrides)
        if s.world_size != p.world_size or s.world_size > 1:
            run += f"  (--world-size {s.world_size}; torchrun --nproc-per-node {s.world_size})"
        lines.append(f"     apply: {run}")
    return lines


def render(p) -> str:
    return "\n".join(_header(p) + _memory(p) + _compute(p) + _fit(p))
