"""Resuming with a config that differs from the checkpoint's: which changes are safe, and what
``train.resume_changes: apply`` does with the others.

A checkpoint carries the optimizer's and scheduler's state, including the learning rate, betas and
weight decay it was built with; loading it silently overrides the same settings in a new config
(a changed ``train.lr`` was ignored while ``config.yaml`` showed it). So a resumed run compares its
config with the one stored in the checkpoint's ``state.json`` and, for anything outside
``RESUMABLE_CHANGES``, either refuses (the default, naming each key with its old and new value)
or, with ``apply``, puts this config's optimizer settings back after loading: the weights,
optimizer moments, step, data position and RNG state come from the checkpoint, everything else
from the new config, and the learning rate from the resume step on is the new base rate times
the (new) schedule's factor at that step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .config import ConfigError, TrainConfig

# Keys a resumed run may change without train.resume_changes=apply: they decide how long the run
# goes on, what it reports and how often it saves, and how the same maths is computed (device,
# kernels, chunking, recomputation, attention implementation), not what is trained. A new
# max_steps / epochs recomputes the schedule for the new total (the learning rate from the resume
# step on follows it). train.batch_size and train.grad_accum may change together when their
# product (the rows per optimizer step and process) stays the same.
RESUMABLE_CHANGES = frozenset(
    {
        "output",
        "resume",
        "overwrite",
        "train.max_steps",
        "train.epochs",
        "train.log_every",
        "train.eval_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.progress_bar",
        "train.device",
        "train.distributed",
        "train.dist_timeout",
        "train.fsdp.reshard_after_forward",
        "train.fsdp.cpu_offload",
        "train.compile",
        "train.fast_kernels",
        "train.gradient_checkpointing",
        "train.loss_chunk_size",
        "train.lora_compute",
        "train.max_nonfinite_steps",
        "train.resume_changes",
        "train.report_to",
        "train.sample_every",
        "train.sample_prompts",
        "train.sample_max_new_tokens",
        "train.early_stopping_patience",
        "train.keep_best",
        "model.attn_implementation",
        "data.eval",
    }
)


def resume_changes(cfg: TrainConfig, resume_dir: Path | None, say) -> dict[str, tuple]:
    """Settings that differ from the checkpoint's and are not in RESUMABLE_CHANGES, as
    ``{key: (checkpoint value, new value)}``: refused (ConfigError listing them) unless
    ``train.resume_changes`` is ``apply``, when they are returned for the caller to apply.

    Without this check a changed ``train.lr`` would be overridden by the scheduler state in the
    checkpoint while ``config.yaml`` showed the new value."""
    if resume_dir is None:
        return {}
    state = json.loads((resume_dir / "state.json").read_text())
    saved = state.get("config")
    if not isinstance(saved, dict):
        return {}  # a checkpoint from before configs were stored: nothing to compare
    changes = config_changes(cfg, saved)
    t, was = cfg.train, saved.get("train", {})
    rows = t.batch_size * t.grad_accum  # per process; the global batch also counts the processes
    same_global = rows * int(os.environ.get("WORLD_SIZE", "1")) == state.get("global_batch")
    if rows == was.get("batch_size", 0) * was.get("grad_accum", 0) or same_global:
        changes.pop("train.batch_size", None)  # the same rows per step, split differently
        changes.pop("train.grad_accum", None)
    unsafe = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
    listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in unsafe.items())
    if unsafe and t.resume_changes != "apply":
        raise ConfigError(
            f"resume: the config differs from the checkpoint {resume_dir}'s in {listed}; restore "
            "them, or set train.resume_changes=apply to continue with the new values from the "
            f"checkpoint's step (free to change: {', '.join(sorted(RESUMABLE_CHANGES))})"
        )
    if unsafe:
        say(f"resume: applying changed settings from the checkpoint's step on: {listed}")
    return unsafe


def config_changes(cfg: TrainConfig, saved: dict) -> dict[str, tuple]:
    """``{dotted key: (saved, current)}`` for every leaf setting that differs. Keys the saved
    config lacks (settings newer than the checkpoint) are not compared."""
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    changes = {}

    def walk(obj, now: dict, was: dict, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.name not in was or f.name not in now:
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and isinstance(was[f.name], dict):
                walk(value, now[f.name], was[f.name], f"{prefix}{f.name}.")
            elif now[f.name] != was[f.name]:
                changes[prefix + f.name] = (was[f.name], now[f.name])

    walk(cfg, current, saved, "")
    return changes


def use_settings(optimizer, scheduler, settings: list[dict]) -> None:
    """Put this config's optimizer settings back after loading a checkpoint's state (which brings
    its own lr, betas, weight decay and the scheduler's base lr): the lr at the resume step is
    the new base lr times the (new) schedule's factor at that step."""
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
