"""Will this fine-tune fit, how long will a step take, and what would make it fit: ``lf.plan``.

::

    import loraforge as lf
    p = lf.plan("configs/plan_qlora_70b.yaml", memory="24GiB", world_size=2, device="cuda")
    p.memory.peak_bytes, p.fits, p.seconds_per_step
    print(p.render())            # the breakdown, the step's FLOPs and time, the suggestions

The model is built on the meta device from its ``config.json`` (``shape.py``: a directory,
``builtin:NAME``, a ``.gguf``, a hub id, or a shape shipped in ``planning/shapes/``, e.g.
``llama-3-70b``); no weight is read. Memory: ``memory.estimate_memory``; FLOPs and time:
``flops.py``; suggestions: ``advice.py``.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..training.config import ConfigError, TrainConfig

__all__ = ["Plan", "parse_memory", "plan"]

# (the memory estimate and the FLOPs import torch and transformers; they load on first use)

_UNITS = {"": None, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
MEMORY_HELP = (
    "a number and a unit: GiB/MiB/TiB (2^30, 2^20, 2^40 bytes) or GB/MB/TB (10^9, 10^6, 10^12); "
    "G/M/T alone are GiB/MiB/TiB, as in `free -g`. A GPU sold as '24 GB' holds 24 GiB: write 24GiB"
)


def parse_memory(text: str | int | float, key: str = "--memory") -> int:
    """Bytes in ``"24GiB"``, ``"24GB"``, ``"24G"``, ``"24000MB"``, ``"80 GiB"`` (``MEMORY_HELP``);
    an int is taken as bytes. A string without a unit, or that does not parse, is a ConfigError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{key}: must be > 0 bytes, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m[2].lower()
    if not m or unit not in _UNITS:
        raise ConfigError(f"{key}: cannot read {text!r} as an amount of memory; {MEMORY_HELP}")
    if not unit:
        raise ConfigError(f"{key}: {text!r} has no unit (24GiB? 24GB?); {MEMORY_HELP}")
    value = float(m[1]) * _UNITS[unit]
    if value < 1:
        raise ConfigError(f"{key}: must be > 0 bytes, got {text!r}")
    return int(value)


def fmt_bytes(n: float) -> str:
    """``73.0 GiB`` / ``512.0 MiB`` / ``12.0 KiB`` (binary units, as GPU memory is sold and shown)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}" if unit == "GiB" else f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


def fmt_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s" if s >= 0.01 else f"{s * 1e3:.3g} ms"


@dataclass
class Suggestion:
    """One change to the run (``overrides``, and the world size for FSDP) with its new estimate."""

    change: str
    cost: str  # what it costs the user: speed, quality, devices
    overrides: list[str]
    world_size: int
    peak_bytes: int
    fits: bool
    seconds_per_step: float
    rank: int = 0  # the order of cost: lower is cheaper

    def to_dict(self) -> dict:
        keys = ("change", "cost", "overrides", "world_size", "peak_bytes", "fits", "seconds_per_step")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Plan:
    """The plan of one training run on one kind of device (per process: with ``world_size`` > 1 each
    process holds ``memory`` and does ``flops_per_step``)."""

    config: TrainConfig
    model_config: dict
    device: str
    world_size: int
    memory: typing.Any  # memory.MemoryEstimate
    flops: typing.Any  # flops.StepFlops
    gemm: typing.Any  # flops.GemmRate
    params: dict  # total / trainable parameter counts
    budget_bytes: int | None = None
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def flops_per_step(self) -> int:
        return self.flops.total

    @property
    def seconds_per_step(self) -> float:
        return self.flops.total / self.gemm.flops_per_s

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits ``budget_bytes`` (None when no budget was given)."""
        return None if self.budget_bytes is None else self.memory.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {
            "model": self.config.model.path,
            "method": self.config.method,
            "device": self.device,
            "world_size": self.world_size,
            "distributed": self.config.train.distributed,
            "params": dict(self.params),
            "memory": self.memory.to_dict(),
            "flops_per_step": self.flops_per_step,
            "flops": self.flops.to_dict(),
            "gemm": self.gemm.to_dict(),
            "seconds_per_step": self.seconds_per_step,
            "tokens_per_s": self.flops.tokens * self.world_size / self.seconds_per_step,
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "suggestions": [s.to_dict() for s in self.suggestions],
        }

    def render(self) -> str:
        from .render import render

        return render(self)


def load_config(config, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """``config`` as ``lf.train`` takes it (a YAML path, a dict, a TrainConfig) with ``overrides``;
    a plan needs no data, so a config without ``data.train`` is accepted."""
    try:
        return TrainConfig.load(config, overrides)
    except ConfigError as e:
        if "data.train: required" not in str(e):
            raise
    return TrainConfig.load(config, [*overrides, "data.train=(not read by the plan)"])


def plan(
    config: TrainConfig | dict | str | Path,
    *,
    overrides: typing.Sequence[str] = (),
    device: str = "cpu",
    memory: str | int | None = None,
    world_size: int = 1,
    gemm_flops: float | None = None,
) -> Plan:
    """Plan the training run ``config`` (+ ``overrides``) on ``world_size`` processes of ``device``.

    ``memory``: the memory of one device (``"24GiB"``, bytes); given, the plan says whether the run
    fits and lists the cheapest changes that make it fit. ``gemm_flops``: the matmul rate in FLOP/s
    (default: measured on the CPU, measured on a GPU that is here, else a stated GPU's)."""
    from .memory import planned_model_cache

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size: must be a whole number >= 1, got {world_size!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ConfigError(f"device: expected cpu or cuda, got {device!r}")
    budget = None if memory is None else parse_memory(memory, "memory")
    if gemm_flops is not None and not gemm_flops > 0:
        raise ConfigError(f"gemm rate: must be > 0 FLOP/s, got {gemm_flops!r}")
    cfg = load_config(config, overrides)
    model_config = _model_config(cfg)
    with planned_model_cache():  # (the advice re-estimates mostly the same model: built once)
        return _plan(cfg, model_config, str(device), world_size, budget, gemm_flops)


def _plan(cfg: TrainConfig, model_config: dict, device: str, world_size: int, budget: int | None,
          gemm_flops: float | None) -> Plan:  # fmt: skip
    from . import advice
    from .flops import GemmRate, default_gemm_rate

    estimate = advice.evaluate(cfg, model_config, device, world_size)
    dtype = advice.compute_dtype(cfg, device)
    if gemm_flops is None:
        gemm = default_gemm_rate(str(device), dtype)
    else:
        gemm = GemmRate(float(gemm_flops), f"given: {gemm_flops / 1e12:g} TFLOP/s")
    result = Plan(cfg, model_config, str(device), world_size, estimate.memory, estimate.flops, gemm,
                  estimate.params, budget)  # fmt: skip
    if budget is not None and not result.fits:
        result.suggestions = advice.suggest(result)
    return result


def _model_config(cfg: TrainConfig) -> dict:
    from .shape import model_config_of

    config = model_config_of(cfg.model.path)
    if not config.get("model_type"):
        raise ConfigError(f"model.path: {cfg.model.path}: its config.json has no model_type (no model shape)")
    return config
