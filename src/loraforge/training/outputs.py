"""What a run writes besides its metrics: checkpoints (single-process or sharded), the adapter
or model (gathered from FSDP shards where needed), and the summary of the run."""

from __future__ import annotations

import math
from pathlib import Path

from . import checkpoint as ckpt
from . import fsdp
from . import sharded_checkpoint as sharded_ckpt
from .config import TrainConfig
from .data import BatchPlan
from .modeling import save_trained
from .report import peak_host_bytes, plot_losses


def save_checkpoint(
    cfg: TrainConfig,
    out: Path,
    step: int,
    loss: float,
    plan: BatchPlan,
    dist,
    model,
    tokenizer,
    optimizer,
    scheduler,
) -> Path | None:
    """A checkpoint at ``step`` (written by the main process, or under FSDP by every process
    together; None on the others)."""
    if not dist.is_main and not dist.fsdp:
        return None
    state = {
        "epoch": plan.epoch_of(step),
        "step_in_epoch": step % plan.steps_per_epoch,  # the data position
        "rows_seen": step * plan.global_batch,
        "global_batch": plan.global_batch,
        "world_size": dist.world_size,
        "loss": loss,
        "method": cfg.method,
        "config": cfg.to_dict(),
    }
    save_adapter = None
    if cfg.method != "full":
        save_adapter = lambda d: save_result(model, tokenizer, d, cfg.method, dist)  # noqa: E731
    if dist.fsdp:
        keep = cfg.train.keep_checkpoints
        path = sharded_ckpt.save(out, step, model, optimizer, scheduler, state, dist, save_adapter, keep)
        return path if dist.is_main else None
    return ckpt.save_checkpoint(
        out, step, model, optimizer, scheduler, state, save_adapter, cfg.train.keep_checkpoints
    )


def weights_from(model, optimizer, scheduler, dist):
    """``load(checkpoint)``: the trainable weights of a checkpoint directory back into ``model``
    (``train.keep_best``), on every process, each its shards under FSDP, from either checkpoint
    format: resume's loaders, whose optimizer, scheduler and RNG states come along, unused after
    the loop; the RNG is put back as it was, so that the caller's random numbers do not depend
    on keep_best."""

    def load(directory: Path) -> None:
        rng = ckpt.rng_state()
        if dist.fsdp or sharded_ckpt.is_sharded_checkpoint(directory):
            sharded_ckpt.load(directory, model, optimizer, scheduler, dist)
        else:
            ckpt.load_checkpoint(directory, model, optimizer, scheduler)
        ckpt.set_rng_state(rng)

    return load


def save_result(model, tokenizer, directory: Path, method: str, dist) -> None:
    """``save_trained`` by the main process. Under FSDP every process takes part in gathering
    what is saved: only the trainable tensors for an adapter (the base stays sharded), the whole
    model, one tensor at a time onto the main process's CPU, for full fine-tuning."""
    if not dist.fsdp:
        if dist.is_main:
            save_trained(model, tokenizer, directory, method)
        return
    if method == "full":
        state = fsdp.full_state_dict(model)
        if dist.is_main:
            save_trained(model, tokenizer, directory, method, state_dict=state)
        return
    with fsdp.gathered_trainable(model):
        if dist.is_main:
            save_trained(model, tokenizer, directory, method)


def results(
    cfg: TrainConfig,
    out: Path,
    dist,
    model,
    tokenizer,
    log,
    step: int,
    run_tokens: int,
    run_time: float,
    counts: dict,
) -> dict:
    """Save the adapter (or model) and the loss plot; the run's metrics, also logged as its end."""
    final_dir = out / ("model" if cfg.method == "full" else "adapter")
    save_result(model, tokenizer, final_dir, cfg.method, dist)
    if dist.is_main:
        plot_losses(log, out / "loss.png", title=f"{cfg.method} fine-tune of {cfg.model.path}")
    _, train_losses = log.series("loss")
    _, eval_losses = log.series("eval_loss")
    metrics = {
        "method": cfg.method,
        "steps": step,
        "train_loss": train_losses,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "initial_eval_loss": eval_losses[0] if eval_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "final_eval_ppl": math.exp(min(eval_losses[-1], 50)) if eval_losses else None,
        "tokens_per_s": run_tokens / run_time if run_tokens else None,
        "train_time_s": run_time,
        **counts,
        "world_size": dist.world_size,
        "peak_host_bytes": peak_host_bytes(),  # this (the main) process's, over the whole run
        "output_dir": str(out),
        "result_dir": str(final_dir),
    }
    log.write(step=step, event="end", **{k: v for k, v in metrics.items() if k != "train_loss"})
    if log.trackers is not None:  # the final adapter (or model) as an artifact, then the runs end
        log.trackers.finish(final_dir)
    return metrics
