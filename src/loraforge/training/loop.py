"""The training loop: one function that reads top to bottom.

Loss normalisation. One optimizer step sees a global batch (``batch_size × grad_accum ×
world_size`` rows) containing ``N`` target tokens in total. Each micro-batch contributes
``Σ_tokens CE / N`` to the gradient, so the step's gradient is that of the mean token loss over
the whole global batch, whatever the split into micro-batches and processes. DDP averages
gradients over the ``W`` processes, hence the factor ``W`` on each process's micro-batch loss.
Every process knows ``N`` without communicating: the batch plan is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from ..adapters import set_compute
from ..injection import count_parameters
from ..optim import build_optimizer, loraplus_param_groups
from . import checkpoint as ckpt
from . import comm, fsdp
from . import sharded_checkpoint as sharded_ckpt
from .config import ConfigError, TrainConfig, TrainSection
from .console import Console, Phase, StopRequest
from .data import BatchPlan, check_data, collate, load_datasets, to_device
from .dist import (
    abort,
    all_reduce_sum,
    cleanup,
    communication_report,
    lost_contact,
    lost_contact_error,
    setup,
    wrap_ddp,
)
from .evaluating import EarlyStopping, evaluator
from .fast import compile_layers, patch_model, should_compile, uncompile_layers, unpatch_model
from .lock import OutputLock, RunError, describe_holder
from .loss import CausalLMLoss
from .modeling import check_device, check_packed_attention, prepare_model
from .outputs import results, save_checkpoint, weights_from
from .report import MetricsLog, peak_host_bytes
from .resume import resume_changes, use_settings
from .samples import Sampler
from .trackers import Trackers, check_trackers


def train(config: TrainConfig | dict | str, overrides=()) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a causal LM as ``config`` says; returns ``(model, metrics)``.

    config: a ``TrainConfig``, a dict of the same shape, or a YAML path; ``overrides`` are
    ``"key.sub=value"`` strings. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint after the current
    step and raises ``KeyboardInterrupt``; ``resume: auto`` continues from it.

    The run holds an exclusive lock on ``output`` from before anything there is read or deleted
    until it returns (see ``lock.py``); a second run on it raises ``RunError`` naming the holder.
    ``RunError`` also reports an output that cannot be written (checked before the model loads),
    a loss or gradient norm that stopped being finite, and a failed write during the run.
    """
    cfg = TrainConfig.load(config, overrides)
    # What can be found wrong before a model loads: the device, and the data files (missing, an
    # unknown format, a bad row among the first ones).
    check_device(cfg.train.device)
    check_data(cfg.data)
    check_trackers(cfg.train.report_to)  # a missing tracker library: the extra to install
    dist = setup(cfg.train.device, cfg.train.distributed, cfg.train.dist_timeout)
    out = Path(cfg.output)
    console = Console(dist.is_main)
    lock = OutputLock(out) if dist.is_main else None  # also the probe that `out` is writable
    if lock is not None and lock.previous:
        console.say(
            f"output {out}: took over the lock of a run that has ended ({describe_holder(lock.previous)})"
        )
    phase = Phase()
    finished = False
    try:
        result = _train(cfg, dist, out, console, phase)
        finished = True
        return result
    except KeyboardInterrupt as e:
        if e.args:  # the loop's own stop (checkpoint saved) or a second Ctrl-C: it says what happened
            raise
        raise KeyboardInterrupt(phase.interrupted(out)) from None
    except OSError as e:
        if phase.name == "start-up":
            raise  # a missing model or data file: its own message
        newest = ckpt.latest_checkpoint(out)
        raise RunError(
            f"output {out}: a write failed at step {phase.step} ({e}); "
            f"newest complete checkpoint: {newest or 'none'}"
        ) from e
    except BaseException as e:  # (DCP's CheckpointException is a BaseException)
        if not lost_contact(dist, e):
            raise
        abort(dist)  # no barrier, no goodbye: the peer is gone; leave at once
        where = {"training": f"after step {phase.step}", "start-up": "during start-up"}.get(
            phase.name, f"while {phase.name}"
        )
        newest = ckpt.latest_checkpoint(out)
        raise lost_contact_error(dist, where, e, newest, cfg.train.dist_timeout) from None
    finally:
        if phase.trackers is not None:  # a run that stopped early: its tracker runs end too (marked
            # failed); an error there must not hide the one that stopped the run
            with contextlib.suppress(Exception):
                phase.trackers.finish(None, failed=not finished)
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, dist, out: Path, console: Console, phase: Phase):
    """The run itself, top to bottom; ``train`` holds the output's lock around it."""
    t: TrainSection = cfg.train
    say = console.say

    # -- where to start; model, data, optimizer -------------------------------------------------
    resume_dir = _resume_dir(cfg, out, dist.is_main, say)
    changed = resume_changes(cfg, resume_dir, say)  # refuses what would silently not apply
    _seed_everything(t.seed)
    model, tokenizer = prepare_model(cfg, dist.device, say, dist=dist)
    train_rows, eval_rows = load_datasets(cfg.data, tokenizer, t.seed, say)
    if cfg.data.packing:
        check_packed_attention(model)
    core = CausalLMLoss(model, t.loss_chunk_size)
    if dist.fsdp:  # shard before the optimizer sees the parameters (they become DTensor shards)
        fsdp.shard_model(model, core, t.fsdp, dist.mesh, dist.device)
    plan = BatchPlan(len(train_rows), t.batch_size, t.grad_accum, dist.world_size, t.seed)
    row_targets = [r.n_targets for r in train_rows]  # trained tokens per row
    row_tokens = [len(r.input_ids) for r in train_rows]
    total_steps = t.max_steps or t.epochs * plan.steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]
    if t.loraplus_lr_ratio:  # LoRA+: B at ratio x lr (the groups carry their own rates)
        groups = loraplus_param_groups(
            model, t.lr, t.loraplus_lr_ratio, t.weight_decay, t.loraplus_lr_embedding
        )
        optimizer = build_optimizer(t.optimizer, groups, t.lr, t.weight_decay, tuple(t.betas))
    else:
        optimizer = build_optimizer(t.optimizer, trainable, t.lr, t.weight_decay, tuple(t.betas))
    scheduler = LambdaLR(optimizer, _lr_lambda(t, total_steps))
    step = 0
    if resume_dir is not None:
        step = _load_checkpoint(
            resume_dir, model, optimizer, scheduler, changed, plan, total_steps, dist, say
        )
    compiled = _speed_up(model, core, cfg, dist, passes=(total_steps - step) * t.grad_accum, say=say)
    # DDP over the trainable tensors when torchrun started us; FSDP's root unit is the loss module
    loss_model = core if dist.fsdp else wrap_ddp(core, dist)
    counts = _announce(cfg, model, trainable, plan, total_steps, dist, say)
    log = _start_log(cfg, out, dist.is_main, step if resume_dir else None, changed)
    phase.trackers = log.trackers
    # (the main process samples from the unwrapped model: no collective runs; under FSDP all do)
    sampler = Sampler(model, tokenizer, t, out, log.trackers, dist, step if resume_dir else None, core)
    pad_id = tokenizer.pad_token_id
    evaluate = evaluator(model, core, eval_rows, t.batch_size, pad_id, dist, log, say)
    early = EarlyStopping(t, out, log, step if resume_dir else None, cfg.method)
    if step == 0 and eval_rows:
        early.update(step, evaluate(step))  # (the start's loss is a reference, saved nowhere)
    sampler.at(step)  # at 0: what the model answers before training

    # -- the loop ---------------------------------------------------------------------------------
    stop = StopRequest(console)
    console.open_bar(total_steps, step, t.progress_bar)
    model.train()
    run_start, run_tokens, nonfinite = time.perf_counter(), 0, 0
    meter = comm.CommMeter() if dist.enabled and not compiled else None  # the first step's collectives
    phase.name, phase.step = "training", step
    try:
        while step < total_steps and not early.stop:
            step_start = time.perf_counter()
            rows = plan.step_rows(step)
            n_targets = sum(row_targets[j] for j in rows)  # global, known to every process
            n_tokens = sum(row_tokens[j] for j in rows)

            micro_batches = [[train_rows[j] for j in b] for b in plan.micro_batches(step, dist.rank)]
            with meter or contextlib.nullcontext():
                loss_sum = _forward_backward(loss_model, micro_batches, n_targets, pad_id, dist)

            # clip; the loss and gradient norm come to the host together (the step's one device
            # sync), with one small all-reduce of the loss and of whether any process was asked to
            # stop. A NaN/Inf loss or norm skips the optimizer update: the weights stay finite.
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf"))
            grad_norm = fsdp.full_tensor(grad_norm)  # FSDP: the norm over every shard (a DTensor)
            local_loss, norm = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()
            loss_total, stop_votes = all_reduce_sum(dist, local_loss, float(stop.requested))
            loss = loss_total / n_targets
            finite = math.isfinite(loss) and math.isfinite(norm)
            nonfinite = 0 if finite else nonfinite + 1
            lr = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            phase.step = step

            # log
            elapsed = time.perf_counter() - step_start
            run_tokens += n_tokens
            tokens_per_s = run_tokens / (time.perf_counter() - run_start)
            if step % t.log_every == 0 or step == total_steps or not finite:
                log.write(step=step, **_memory(dist.device))  # (its own record: the row's names are kept)
                row = dict(loss=loss, lr=lr, grad_norm=norm, tokens=n_tokens, step_time_s=elapsed)
                skipped = {} if finite else {"skipped": True}
                log.write(
                    step=step, epoch=plan.epoch_of(step - 1), **row, tokens_per_s=tokens_per_s, **skipped
                )
            console.advance(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if meter is not None:  # measured once: said, and in the metrics
                counts["comm_bytes_per_step"] = dict(meter.bytes)
                say(comm.describe(meter.bytes, step, dist.world_size))
                meter = None
            if nonfinite >= t.max_nonfinite_steps:
                raise _nonfinite_stop(step, loss, norm, nonfinite, t, out, log)

            # eval, samples; save every save_every steps, at the end, at a new best, when asked to stop
            if eval_rows and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
                early.update(step, evaluate(step))  # (the same on every process: the loss is all-reduced)
            sampler.at(step)
            if (t.save_every and step % t.save_every == 0) or step == total_steps or stop_votes or early.save:
                saved = save_checkpoint(
                    cfg, out, step, loss, plan, dist, model, tokenizer, optimizer, scheduler
                )
                early.saved(saved)
            if stop_votes:  # saved first, then reported (printing may fail: stdout's reader may be gone)
                console.close_bar()
                say(f"stopped at step {step}; checkpoint saved: {saved or out / 'checkpoints'}")
                raise KeyboardInterrupt(f"training stopped at step {step}; resume with resume: auto")
    finally:
        console.close_bar()
        stop.restore()

    # -- results ------------------------------------------------------------------------------------
    phase.name = "writing the results"
    sampler.at(step, end=True)  # the end's answers (nothing new when the last step was a sampling step)
    _undo_speed_up(model, compiled)  # the caller gets the model with its own forwards
    run_time = time.perf_counter() - run_start
    counts.update(early.results(step, say, dist, weights_from(model, optimizer, scheduler, dist)))
    metrics = results(cfg, out, dist, model, tokenizer, log, step, run_tokens, run_time, counts)
    cleanup(dist)
    return model, metrics


# -- set-up -------------------------------------------------------------------------------------


def _resume_dir(cfg: TrainConfig, out: Path, is_main: bool, say) -> Path | None:
    """The checkpoint to continue from, or None; refuses to start over existing checkpoints
    unless ``overwrite``. Runs under the output's lock, so deleting here is safe."""
    if is_main:
        removed = ckpt.clean_partial(out)  # what a run killed while saving or pruning left
        if removed:
            say(f"removed incomplete checkpoint files left by an earlier run: {', '.join(removed)}")
    if isinstance(cfg.resume, str) and cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / "state.json").is_file():
            raise ConfigError(f"resume: {path} is not a complete checkpoint (no state.json)")
        return path
    latest = ckpt.latest_checkpoint(out)
    if cfg.resume in (True, "auto"):
        if latest is None:
            say(f"resume: no checkpoint under {out}; starting from scratch")
        return latest
    if latest is not None and not cfg.overwrite:
        raise ConfigError(
            f"{out} already holds checkpoints (newest: {latest.name}); pass --resume (resume: auto) "
            f"to continue, overwrite=true to start again, or choose another output"
        )
    if latest is not None and is_main:
        shutil.rmtree(ckpt.checkpoint_root(out), ignore_errors=True)
    return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _lr_lambda(t: TrainSection, total_steps: int):
    """Multiplier of ``t.lr`` at a step: linear warm-up from ~0, then the schedule down to
    ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        shape = 1 - progress if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return factor


def _load_checkpoint(
    resume_dir: Path,
    model,
    optimizer,
    scheduler,
    changed: dict,
    plan: BatchPlan,
    total_steps: int,
    dist,
    say,
) -> int:
    """Weights, optimizer and scheduler state from ``resume_dir``; returns its step. With
    ``changed`` (resume_changes: apply), this config's optimizer settings apply from there on."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if dist.fsdp or sharded_ckpt.is_sharded_checkpoint(resume_dir):  # (either format, either way)
        state = sharded_ckpt.load(resume_dir, model, optimizer, scheduler, dist)
    else:
        state = ckpt.load_checkpoint(resume_dir, model, optimizer, scheduler)
    step = state["step"]
    if changed:
        use_settings(optimizer, scheduler, settings)
    if state.get("global_batch") != plan.global_batch:
        say(
            f"warning: the checkpoint's global batch was {state.get('global_batch')} rows, "
            f"now {plan.global_batch}: the data order differs from the original run"
        )
    say(f"resumed from {resume_dir} at step {step}/{total_steps}")
    return step


def _speed_up(model, core, cfg: TrainConfig, dist, passes: int, say) -> bool:
    """The LoRA branch's compute mode, then either the exact fast MLP / RMSNorm forwards or
    torch.compile per decoder layer (``passes`` forward+backward passes to come decide "auto");
    returns whether the layers were compiled. :func:`_undo_speed_up` removes both."""
    t = cfg.train
    if cfg.method != "full":
        set_compute(model, t.lora_compute)
    compiled, why = should_compile(t.compile, dist.device, t.gradient_checkpointing, passes)
    if compiled and dist.fsdp:
        compiled = False  # FSDP2's hooks per layer; not combined with per-layer compilation here
        say("torch.compile: off under train.distributed=fsdp")
    # Not the fast forwards under torch.compile, which fuses and recomputes those ops itself, and
    # whose CUDA backend gave wrong gradients for the hand-written backward (BENCHMARKS.md).
    if t.fast_kernels and not compiled:
        # (the probe runs the MLPs and norms on their own: under FSDP, inside a gathered unit)
        n_fast = fsdp.for_each_unit(model, core, patch_model) if dist.fsdp else patch_model(model)
        if n_fast:
            say(f"fast kernels: {n_fast} MLP / RMSNorm modules")
    if compiled:
        say(f"torch.compile ({why}): {compile_layers(model)} decoder layers (the first steps compile)")
    return compiled


def _announce(cfg: TrainConfig, model, trainable: list, plan: BatchPlan, total_steps: int, dist, say) -> dict:
    """Say what will be trained, how long and where; returns the parameter counts for the metrics."""
    t = cfg.train
    n_train, n_total = count_parameters(model)
    say(f"{cfg.method}: trainable params {n_train:,} of {n_total:,} ({100 * n_train / n_total:.4f}%)")
    say(
        f"steps: {total_steps} ({plan.steps_per_epoch} per epoch) x global batch {plan.global_batch} rows "
        f"= {t.batch_size} x {t.grad_accum} accumulation x {dist.world_size} processes; device {dist.device}"
    )
    sharded = {}
    if dist.fsdp:
        mine, whole = fsdp.local_bytes(model)
        peak = peak_host_bytes()
        sharded = {
            "param_bytes_per_process": mine,
            "param_bytes_total": whole,
            "peak_host_bytes_at_start": peak,
        }
        say(
            f"fsdp: {len(fsdp.decoder_layers(model))} layer units + root over {dist.world_size} "
            f"process(es); parameters held here {mine / 1e6:,.1f} MB of {whole / 1e6:,.1f} MB "
            f"({mine / max(whole, 1):.3f}; 1/world = {1 / dist.world_size:.3f}); "
            f"peak host memory so far {peak / 1e6:,.0f} MB"
        )
    elif dist.enabled:
        say(communication_report(model, dist.world_size))
    reduced = sum(p.numel() * p.element_size() for p in trainable) if dist.enabled and not dist.fsdp else 0
    return {
        "trainable_params": n_train,
        "total_params": n_total,
        "allreduce_bytes_per_step": reduced,
        **sharded,
    }


def _start_log(
    cfg: TrainConfig, out: Path, is_main: bool, resume_step: int | None, changed: dict
) -> MetricsLog:
    """``config.yaml`` and the metrics log (continued after ``resume_step`` when resuming)."""
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    log = MetricsLog(out / "metrics.jsonl", is_main, resume_step=resume_step)
    if is_main and cfg.train.report_to:  # every record written from here on reaches them too
        config = cfg.to_dict()
        log.trackers = Trackers(cfg.train.report_to, config, out, resume_step is not None, cfg.to_yaml())
    if changed:
        log.write(step=resume_step, event="resume", changed={k: list(v) for k, v in changed.items()})
    return log


def _memory(device: torch.device) -> dict:
    """The main process's peak host memory so far, and on CUDA the peak memory its tensors took."""
    memory = {"peak_host_bytes": peak_host_bytes()}
    if device.type == "cuda":
        memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return memory


# -- in the loop --------------------------------------------------------------------------------


def _forward_backward(loss_model, micro_batches: list, n_targets: int, pad_id: int, dist) -> torch.Tensor:
    """Forward + backward over this process's micro-batches of one step (lists of rows); DDP syncs
    the gradients on the last one. Each adds ``W · Σ CE / N`` (module docstring) to the gradient;
    returns the summed token loss ``Σ CE``, still on the device."""
    loss_sum = torch.zeros((), device=dist.device)
    for i, rows in enumerate(micro_batches):
        batch = to_device(collate(rows, pad_id), dist.device)
        last = i == len(micro_batches) - 1
        if dist.fsdp:
            sync = fsdp.gradient_sync(loss_model, last)
        else:
            sync = loss_model.no_sync() if dist.enabled and not last else contextlib.nullcontext()
        with sync:
            part, _ = loss_model(**batch)
            (part * (dist.world_size / n_targets)).backward()
        loss_sum += part.detach()
    return loss_sum


def _nonfinite_stop(step: int, loss: float, norm: float, n: int, t: TrainSection, out: Path, log) -> RunError:
    """The error that stops a run after ``n`` non-finite steps in a row (logged first)."""
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    log.write(step=step, event="stopped", reason=f"{what} {value}")
    return RunError(
        f"step {step}: the {what} is {value} ({n} step(s) in a row, "
        f"train.max_nonfinite_steps={t.max_nonfinite_steps}); the run stopped. Newest "
        f"checkpoint (finite weights): {ckpt.latest_checkpoint(out) or 'none'}; "
        "a lower train.lr, train.max_grad_norm or another precision may help"
    )


# -- tear-down ----------------------------------------------------------------------------------


def _undo_speed_up(model, compiled: bool) -> None:
    unpatch_model(model)
    if compiled:
        uncompile_layers(model)
