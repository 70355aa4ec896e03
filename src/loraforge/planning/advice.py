"""What would make a run fit: each change re-estimated on the changed config, cheapest first.

A change is a set of ``key=value`` overrides (and, for FSDP, a world size). Each is planned again
with ``memory.estimate_memory`` on the changed config, so its new peak is the planner's own figure,
not a rule of thumb. They are ranked by what they cost the user, cheapest first:

0. a smaller LM-head chunk (``train.loss_chunk_size``): nothing (same loss and gradients);
1. an 8-bit optimizer: no measurable quality change (blockwise 8-bit AdamW, as QLoRA trains);
2. a smaller micro-batch with more accumulation: the same effective batch, slower steps;
3. activation checkpointing: each layer's forward runs again in backward (its FLOPs are counted);
4. FSDP over the devices the run already has (``--world-size`` N with ddp): no new hardware;
5. FSDP's CPU offload (``train.fsdp.cpu_offload``, CUDA; a run under FSDP or moved to it over its
   devices): the shards live in host RAM (how much: the estimate's ``host_bytes``), slower steps;
6. QLoRA (a 4-bit NF4 base): a small quality change, dequantization in every step;
7. FSDP over more devices: the smallest N that fits;
8. a shorter ``data.max_length``: longer rows are truncated, so the model sees less of them.

When no single change fits, they are stacked in that order until the run fits.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

from ..training.config import FSDP_METHODS, ConfigError, TrainConfig
from . import Suggestion, fmt_bytes

SEARCHES = (2, 4, 7, 8)  # the ranks whose change is searched (micro-batch, devices, max_length)
MAX_DEVICES = 512  # the largest FSDP world size a suggestion considers
OFFLOAD, MORE_DEVICES = 5, 7  # the ranks of FSDP's CPU offload and of FSDP over more devices


@dataclass
class Evaluation:
    memory: object  # memory.MemoryEstimate
    flops: object  # flops.StepFlops
    params: dict


@functools.lru_cache(maxsize=4)
def _meta(config_json: str):
    """The bare base (no adapter) on the meta device, shared by every evaluation of one shape."""
    from .shape import meta_model

    return meta_model(json.loads(config_json))


def compute_dtype(cfg: TrainConfig, device: str) -> str:
    """The dtype the step's matrix products run in (``model.dtype``; auto: bf16 on a GPU)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    return dtype


def evaluate(cfg: TrainConfig, model_config: dict, device: str, world_size: int) -> Evaluation:
    """Memory, FLOPs and parameter counts of ``cfg`` (raises ConfigError naming what is wrong)."""
    from .flops import LORA_METHODS, linears, step_flops
    from .memory import cached, estimate_memory, planned_key, resolve_dtype

    try:
        shape = json.dumps(model_config, sort_keys=True, default=str)
        model = _meta(shape)
        memory = estimate_memory(cfg, model_config=model_config, device=device, world_size=world_size)
        flops = step_flops(cfg, model, model.config)
        # (the counts depend on the model and adapter alone: once per plan for the advice's re-estimates)
        unique = lambda: {id(p): p for p in model.parameters()}.values()  # noqa: E731
        total = cached(("total", shape), lambda: sum(p.numel() for p in unique()))
        if cfg.method == "full":
            trainable = total
        elif cfg.method in LORA_METHODS:
            key = ("trainable", planned_key(cfg, model_config, resolve_dtype(cfg.model.dtype, device)))
            lora = lambda: sum(lin.rank * (lin.fan_in + lin.fan_out) for lin in linears(model, cfg))  # noqa: E731
            trainable = cached(key, lora)
        else:
            trainable = None
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a shape transformers cannot build
        raise ConfigError(f"model.path: {cfg.model.path}: cannot plan this model: {e}") from None
    return Evaluation(memory, flops, {"total": total, "trainable": trainable})


# -- the changes ----------------------------------------------------------------------------------


def _changed(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    return TrainConfig.from_dict(cfg.to_dict(), overrides, source="<plan suggestion>")


class _Trial:
    """Plans changed configs for one plan (``plan.Plan``) and makes their Suggestions."""

    def __init__(self, plan):
        self.plan = plan
        self.budget = plan.budget_bytes
        self.seen: dict[tuple, tuple[int, float, int]] = {}  # (config, world) -> (peak, seconds, host)
        self.last_host = 0  # the host memory (cpu_offload) of the last config run, per process

    def run(self, change: str, cost: str, rank: int, overrides: list[str], world_size: int | None = None,
            base: TrainConfig | None = None) -> Suggestion:  # fmt: skip
        p = self.plan
        world = world_size or p.world_size
        cfg = _changed(base or p.config, overrides)
        key = (cfg.to_yaml(), world)
        if key not in self.seen:  # (stacking tries some configs again)
            ev = evaluate(cfg, p.model_config, p.device, world)
            self.seen[key] = ev.memory.peak_bytes, ev.flops.total / p.gemm.flops_per_s, ev.memory.host_bytes
        peak, seconds, self.last_host = self.seen[key]
        return Suggestion(change, cost, overrides, world, peak, peak <= self.budget, seconds, rank)

    def first_fit(self, tries: list[tuple]) -> Suggestion | None:
        """The first of ``tries`` (cheapest first) that fits, else the last one tried (None if none)."""
        last = None
        for args in tries:
            last = self.run(*args)
            if last.fits:
                return last
        return last


def _candidates(plan) -> list:
    """Functions trial -> Suggestion | None, one per kind of change, in order of cost."""
    cfg = plan.config

    def chunk(trial, base=cfg, extra=()):
        if not base.train.loss_chunk_size:
            return None
        return trial.run("smaller LM-head chunks", "none: the same loss and gradients", 0,
                         [*extra, "train.loss_chunk_size=0"], base=base)  # fmt: skip

    def eight_bit(trial, base=cfg, extra=()):
        if base.train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            return None
        cost = "no measurable quality change (blockwise 8-bit AdamW states); needs bitsandbytes"
        return trial.run("8-bit optimizer", cost, 1, [*extra, "train.optimizer=paged_adamw_8bit"], base=base)

    def micro_batch(trial, base=cfg, extra=()):
        b, acc = base.train.batch_size, base.train.grad_accum
        sizes = [s for s in range(b - 1, 0, -1) if b % s == 0]
        if not sizes:
            return None
        cost = f"the same effective batch ({b * acc} rows per step); slower: smaller products, more passes"
        tries = [(f"micro-batch {s} x {acc * b // s} accumulation", cost, 2,
                  [*extra, f"train.batch_size={s}", f"train.grad_accum={acc * b // s}"], None, base)
                 for s in sizes]  # fmt: skip
        return trial.first_fit(tries)

    def checkpointing(trial, base=cfg, extra=()):
        if base.train.gradient_checkpointing:
            return None
        s = trial.run("activation checkpointing", "", 3, [*extra, "train.gradient_checkpointing=true"],
                      base=base)  # fmt: skip
        before = _flops(plan, base)
        s.cost = f"+{s.seconds_per_step * plan.gemm.flops_per_s / before - 1:.0%} FLOPs per step: each "
        s.cost += "layer's forward runs again in backward"
        return s

    def fsdp(trial, base=cfg, extra=(), existing=True):
        if base.method not in FSDP_METHODS:
            return None
        have = plan.world_size
        rank, span = (4, [have]) if existing else (MORE_DEVICES, range(have + 1, MAX_DEVICES + 1))
        if existing and (have < 2 or base.train.distributed == "fsdp"):  # (no devices to shard over)
            return None
        over = [*extra, "train.distributed=fsdp"]

        def at(n):
            cost = (f"shards the model over the {n} devices the run has" if n <= plan.world_size else
                    f"needs {n} devices; shards the model over them (layers all-gathered each step)")
            return trial.run(f"FSDP over {n} devices", cost, rank, over, n, base)

        return _smallest_n(at, list(span), trial.budget)

    def fsdp_more(trial, base=cfg, extra=()):
        return fsdp(trial, base, extra, existing=False)

    def offload(trial, base=cfg, extra=()):
        # (a CPU run's shards are in host memory already: memory.py counts no offload there)
        cuda = plan.device.startswith("cuda")
        if not cuda or base.method not in FSDP_METHODS or base.train.fsdp.cpu_offload:
            return None
        over, change = [*extra, "train.fsdp.cpu_offload=true"], "FSDP CPU offload"
        if base.train.distributed != "fsdp":
            if plan.world_size < 2:  # (one device: FSDP over more devices is the suggestion instead)
                return None
            over, change = [*extra, "train.distributed=fsdp", "train.fsdp.cpu_offload=true"], \
                f"FSDP over the {plan.world_size} devices with CPU offload"  # fmt: skip
        s = trial.run(change, "", OFFLOAD, over, base=base)
        s.cost = offload_cost(trial.last_host, s.world_size)
        return s

    def qlora(trial, base=cfg, extra=()):
        if base.method not in ("lora", "dora"):
            return None
        over = [*extra, "method=qlora"] + (["lora.use_dora=true"] if base.method == "dora" else [])
        cost = "4-bit NF4 base: small quality change (QLoRA: NF4 + double quantization matched 16-bit); "
        return trial.run("QLoRA (4-bit base)", cost + "dequantization in every step", 6, over, base=base)

    def shorter(trial, base=cfg, extra=()):
        n, tries = base.data.max_length // 2, []
        while n >= 64:
            cost = f"rows longer than {n} tokens are truncated: the model sees less of each example"
            tries.append((f"max_length {n}", cost, 8, [*extra, f"data.max_length={n}"], None, base))
            n //= 2
        return trial.first_fit(tries) if tries else None

    # (index = rank: _stack searches again with the same function)
    return [chunk, eight_bit, micro_batch, checkpointing, fsdp, offload, qlora, fsdp_more, shorter]


def offload_cost(host_bytes: int, world_size: int) -> str:
    """What ``train.fsdp.cpu_offload`` costs: speed, and the host RAM it needs (from the estimate)."""
    total = f", {fmt_bytes(host_bytes * world_size)} for the {world_size} processes" if world_size > 1 else ""
    return ("slower steps: every layer's weight shards are copied host->device as it is gathered and its "
            "gradient shards back, and the optimizer steps on the CPU (the time shown leaves the copies "
            f"out); needs {fmt_bytes(host_bytes)} of host RAM per process{total}")


def _flops(plan, cfg: TrainConfig) -> int:
    from .flops import step_flops

    model = _meta(json.dumps(plan.model_config, sort_keys=True, default=str))
    return step_flops(cfg, model, model.config).total


def _smallest_n(at, span: list[int], budget: int) -> Suggestion | None:
    """The suggestion at the smallest n of ``span`` that fits, else at the largest (marked).

    The memory per process under FSDP is ``a + b/n`` (replicated + sharded parts): from the two ends
    of ``span`` the model predicts n, then neighbours are checked (3-4 estimates, not a scan)."""
    if not span:
        return None
    far = at(span[-1])
    if not far.fits or len(span) == 1:
        return far
    near = at(span[0])
    if near.fits:
        return near
    n0, n1 = span[0], span[-1]
    b = (near.peak_bytes - far.peak_bytes) / (1 / n0 - 1 / n1)
    a = far.peak_bytes - b / n1
    return _walk(at, span, a, b, budget)


def _walk(at, span: list[int], a: float, b: float, budget: int) -> Suggestion:
    """From the predicted n, step down while the smaller n fits, or up (doubling) until one fits."""
    guess = span[-1] if budget <= a else min(span[-1], max(span[0] + 1, math.ceil(b / (budget - a))))
    s = at(guess)
    if s.fits:
        while guess - 1 > span[0]:
            smaller = at(guess - 1)
            if not smaller.fits:
                break
            s, guess = smaller, guess - 1
        return s
    step = 1
    while guess < span[-1]:
        guess = min(span[-1], guess + step)
        s = at(guess)
        if s.fits:
            return s
        step *= 2
    return s


def suggest(plan) -> list[Suggestion]:
    """The changes that make ``plan`` fit its budget, cheapest first; when none does alone, the
    cheapest stack of them that does (or, if even all of them do not, that stack, marked)."""
    trial = _Trial(plan)
    peak = plan.memory.peak_bytes
    singles = [s for c in _candidates(plan) if (s := c(trial)) is not None and s.peak_bytes < peak]
    fitting = sorted((s for s in singles if s.fits), key=lambda s: s.rank)
    if fitting:
        return fitting
    return [_stack(plan, trial, singles)] if singles else []


def _stack(plan, trial: _Trial, singles: list[Suggestion]) -> Suggestion:
    """Apply the helpful changes cumulatively in order of cost until the run fits; a search (micro-
    batch, devices, max_length) runs again on the stack so far."""
    candidates = _candidates(plan)
    chosen: dict[int, tuple[str, str, list[str], int]] = {}  # rank -> (change, cost, overrides, world)
    last = None
    for s in sorted(singles, key=lambda s: s.rank):
        so_far = [o for _, _, own, _ in chosen.values() for o in own]
        if s.rank in SEARCHES:
            s = candidates[s.rank](trial, _changed(plan.config, so_far), so_far)
            if s is None:
                continue
        if s.rank == MORE_DEVICES:  # FSDP over more devices replaces FSDP over the ones the run has
            chosen.pop(4, None)
            so_far = [o for _, _, own, _ in chosen.values() for o in own]
        chosen[s.rank] = (s.change, s.cost, [o for o in s.overrides if o not in so_far], s.world_size)
        last = _run_stack(trial, chosen, s.rank)
        if last.fits:
            break
    if last is not None and last.fits:  # drop what the fit does not need, dearest first
        for rank in sorted(chosen, reverse=True)[1:]:
            fewer = {r: c for r, c in chosen.items() if r != rank}
            if fewer and (trial_fit := _run_stack(trial, fewer, max(fewer))).fits:
                chosen, last = fewer, trial_fit
    return last


def _run_stack(trial: _Trial, chosen: dict, rank: int) -> Suggestion:
    steps = [chosen[r] for r in sorted(chosen)]
    overrides = list(dict.fromkeys(o for _, _, own, _ in steps for o in own))
    world = max(w for *_, w in steps)
    change = " + ".join(c for c, *_ in steps)
    s = trial.run(change, "", rank, overrides, world)
    # (the offload's host RAM is the whole stack's: re-read from this estimate)
    costs = [offload_cost(trial.last_host, world) if r == OFFLOAD else chosen[r][1] for r in sorted(chosen)]
    s.cost = "; ".join(costs)
    return s
