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
import dataclasses
import math
import os
import random
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..adapters import set_compute
from ..injection import count_parameters
from ..optim import build_optimizer
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, TrainSection
from .data import BatchPlan, check_data, collate, load_datasets
from .dist import all_reduce_sum, cleanup, communication_report, setup, wrap_ddp
from .fast import compile_layers, patch_model, should_compile, uncompile_layers, unpatch_model
from .lock import OutputLock, RunError, describe_holder
from .loss import CausalLMLoss
from .modeling import check_device, check_packed_attention, prepare_model, save_trained
from .report import MetricsLog, plot_losses
from .resume import resume_changes, use_settings


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
    dist = setup(cfg.train.device)
    out = Path(cfg.output)
    console = _Console(dist.is_main)
    lock = OutputLock(out) if dist.is_main else None  # also the probe that `out` is writable
    if lock is not None and lock.previous:
        console.say(
            f"output {out}: took over the lock of a run that has ended ({describe_holder(lock.previous)})"
        )
    phase = _Phase()
    try:
        return _train(cfg, dist, out, console, phase)
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
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, dist, out: Path, console: _Console, phase: _Phase):
    """The run itself, top to bottom; ``train`` holds the output's lock around it."""
    t: TrainSection = cfg.train
    say = console.say

    # -- where to start -------------------------------------------------------------------------
    resume_dir = _resume_dir(cfg, out, dist.is_main, say)
    changed = resume_changes(cfg, resume_dir, say)  # refuses what would silently not apply

    # -- model, data, optimizer ---------------------------------------------------------------
    _seed_everything(t.seed)
    model, tokenizer = prepare_model(cfg, dist.device, say)
    train_rows, eval_rows = load_datasets(cfg.data, tokenizer, t.seed, say)
    if cfg.data.packing:
        check_packed_attention(model)
    plan = BatchPlan(len(train_rows), t.batch_size, t.grad_accum, dist.world_size, t.seed)
    row_targets = [r.n_targets for r in train_rows]  # trained tokens per row
    row_tokens = [len(r.input_ids) for r in train_rows]
    total_steps = t.max_steps or t.epochs * plan.steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(t.optimizer, trainable, t.lr, t.weight_decay, tuple(t.betas))
    scheduler = LambdaLR(optimizer, _lr_lambda(t, total_steps))
    step = 0
    if resume_dir is not None:
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = ckpt.load_checkpoint(resume_dir, model, optimizer, scheduler)
        step = state["step"]
        if changed:  # resume_changes: apply — this config's optimizer settings from here on
            use_settings(optimizer, scheduler, settings)
        if state.get("global_batch") != plan.global_batch:
            say(
                f"warning: the checkpoint's global batch was {state.get('global_batch')} rows, "
                f"now {plan.global_batch}: the data order differs from the original run"
            )
        say(f"resumed from {resume_dir} at step {step}/{total_steps}")

    if cfg.method != "full":
        set_compute(model, t.lora_compute)
    passes = (total_steps - step) * t.grad_accum  # forward+backward passes this run will make
    compiled, why = should_compile(t.compile, dist.device, t.gradient_checkpointing, passes)
    # Exact fast MLP / RMSNorm forwards while training (removed at the end); not under
    # torch.compile, which fuses and recomputes those ops itself, and whose CUDA backend gave
    # wrong gradients for the hand-written backward (BENCHMARKS.md)
    if t.fast_kernels and not compiled:
        n_fast = patch_model(model)
        if n_fast:
            say(f"fast kernels: {n_fast} MLP / RMSNorm modules")
    if compiled:  # TorchInductor per decoder layer (removed at the end, like the fast forwards)
        say(f"torch.compile ({why}): {compile_layers(model)} decoder layers (the first steps compile)")
    core = CausalLMLoss(model, t.loss_chunk_size)
    loss_model = wrap_ddp(core, dist)  # DDP over the trainable tensors when torchrun started us
    n_train, n_total = count_parameters(model)
    comm = sum(p.numel() * p.element_size() for p in trainable)
    say(f"{cfg.method}: trainable params {n_train:,} of {n_total:,} ({100 * n_train / n_total:.4f}%)")
    say(
        f"steps: {total_steps} ({plan.steps_per_epoch} per epoch) x global batch {plan.global_batch} rows "
        f"= {t.batch_size} x {t.grad_accum} accumulation x {dist.world_size} processes; device {dist.device}"
    )
    if dist.enabled:
        say(communication_report(model, dist.world_size))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    log = MetricsLog(out / "metrics.jsonl", dist.is_main, resume_step=step if resume_dir else None)
    if changed:
        log.write(step=step, event="resume", changed={k: list(v) for k, v in changed.items()})
    pad_id = tokenizer.pad_token_id

    def evaluate() -> tuple[float, float]:
        """Mean token loss over the eval rows (split over processes) and its perplexity."""
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            mine = eval_rows[dist.rank :: dist.world_size]
            for i in range(0, len(mine), t.batch_size):
                batch = _to(collate(mine[i : i + t.batch_size], pad_id), dist.device)
                loss_sum, n = core(**batch)
                total, count = total + loss_sum.item(), count + n.item()
        total, count = all_reduce_sum(dist, total, count)
        model.train()
        loss = total / max(count, 1)
        return loss, math.exp(min(loss, 50))

    if step == 0 and eval_rows:
        eval_loss, eval_ppl = evaluate()
        log.write(step=0, eval_loss=eval_loss, eval_ppl=eval_ppl)
        say(f"step 0: eval loss {eval_loss:.4f}, perplexity {eval_ppl:.2f}")

    # -- the loop ---------------------------------------------------------------------------------
    stop = _StopRequest(console)
    console.open_bar(total_steps, step, t.progress_bar)
    model.train()
    run_start, run_tokens, last_ckpt, nonfinite = time.perf_counter(), 0, None, 0
    phase.name, phase.step = "training", step
    try:
        while step < total_steps:
            step_start = time.perf_counter()
            rows = plan.step_rows(step)
            n_targets = sum(row_targets[j] for j in rows)  # global, known to every process
            n_tokens = sum(row_tokens[j] for j in rows)

            # forward + backward over this process's micro-batches; gradients sync on the last one
            micro_batches = plan.micro_batches(step, dist.rank)
            loss_sum = torch.zeros((), device=dist.device)
            for i, indices in enumerate(micro_batches):
                batch = _to(collate([train_rows[j] for j in indices], pad_id), dist.device)
                last = i == len(micro_batches) - 1
                no_sync = loss_model.no_sync() if dist.enabled and not last else contextlib.nullcontext()
                with no_sync:
                    part, _ = loss_model(**batch)
                    (part * (dist.world_size / n_targets)).backward()
                loss_sum += part.detach()

            # clip; the loss and gradient norm come to the host together (the step's one device
            # sync), with one small all-reduce of the loss and of whether any process was asked to
            # stop. A NaN/Inf loss or norm skips the optimizer update: the weights stay finite.
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf"))
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
                log.write(
                    step=step,
                    epoch=plan.epoch_of(step - 1),
                    loss=loss,
                    lr=lr,
                    grad_norm=norm,
                    tokens=n_tokens,
                    step_time_s=elapsed,
                    tokens_per_s=tokens_per_s,
                    **({} if finite else {"skipped": True}),
                )
            console.advance(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if nonfinite >= t.max_nonfinite_steps:
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
                log.write(step=step, event="stopped", reason=f"{what} {value}")
                raise RunError(
                    f"step {step}: the {what} is {value} ({nonfinite} step(s) in a row, "
                    f"train.max_nonfinite_steps={t.max_nonfinite_steps}); the run stopped. Newest "
                    f"checkpoint (finite weights): {ckpt.latest_checkpoint(out) or 'none'}; "
                    "a lower train.lr, train.max_grad_norm or another precision may help"
                )

            # eval
            if eval_rows and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
                eval_loss, eval_ppl = evaluate()
                log.write(step=step, eval_loss=eval_loss, eval_ppl=eval_ppl)
                say(f"step {step}: eval loss {eval_loss:.4f}, perplexity {eval_ppl:.2f}")

            # save: every save_every steps, at the end, and when asked to stop
            stopping = stop_votes > 0
            if (t.save_every and step % t.save_every == 0) or step == total_steps or stopping:
                if dist.is_main:
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
                        save_adapter = lambda d: save_trained(model, tokenizer, d, cfg.method)
                    last_ckpt = ckpt.save_checkpoint(
                        out, step, model, optimizer, scheduler, state, save_adapter, t.keep_checkpoints
                    )
            if stopping:  # saved first, then reported (printing may fail: stdout's reader may be gone)
                console.close_bar()
                say(f"stopped at step {step}; checkpoint saved: {last_ckpt or out / 'checkpoints'}")
                raise KeyboardInterrupt(f"training stopped at step {step}; resume with resume: auto")
    finally:
        console.close_bar()
        stop.restore()
    phase.name = "writing the results"
    unpatch_model(model)  # the caller gets the model with its own forwards
    if compiled:
        uncompile_layers(model)

    # -- results ------------------------------------------------------------------------------------
    run_time = time.perf_counter() - run_start
    final_dir = out / ("model" if cfg.method == "full" else "adapter")
    if dist.is_main:
        save_trained(model, tokenizer, final_dir, cfg.method)
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
        "trainable_params": n_train,
        "total_params": n_total,
        "allreduce_bytes_per_step": comm if dist.enabled else 0,
        "world_size": dist.world_size,
        "output_dir": str(out),
        "result_dir": str(final_dir),
    }
    log.write(step=step, event="end", **{k: v for k, v in metrics.items() if k != "train_loss"})
    cleanup(dist)
    return model, metrics


# -- helpers --------------------------------------------------------------------------------------------


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


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclasses.dataclass
class _Phase:
    """Where the run is, for the message of a Ctrl-C or a failed write."""

    name: str = "start-up"  # then "training", then "writing the results"
    step: int = 0

    def interrupted(self, out: Path) -> str:
        if self.name == "start-up":
            return "Ctrl-C during start-up, before the first step: nothing was saved"
        newest = ckpt.latest_checkpoint(out)
        return f"Ctrl-C at step {self.step} ({self.name}); newest complete checkpoint: {newest or 'none'}"


class _Console:
    """What the run prints: lines on stdout, the progress bar on stderr.

    Printing is best effort. When a stream's reader has gone (``loraforge train ... | tee log``:
    Ctrl-C reaches tee too, and it exits first), a write fails with EPIPE; that stream is then
    pointed at /dev/null and the run goes on, so saving never depends on it (nor does the
    interpreter's flush of stdout at exit). Lines are flushed at once so such an error surfaces
    here, not at some later write.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def say(self, text: str) -> None:
        if self.enabled:
            self._guard(lambda: (tqdm.write(text), sys.stdout.flush()))

    def open_bar(self, total: int, initial: int, show: bool) -> None:
        self.bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", disable=not (self.enabled and show)
        )

    def advance(self, **postfix) -> None:
        self._guard(lambda: (self.bar.set_postfix(**postfix, refresh=False), self.bar.update(1)))

    def close_bar(self) -> None:
        if self.bar is not None:
            self._guard(self.bar.close)

    @staticmethod
    def _guard(write) -> None:
        try:
            write()
        except (OSError, ValueError):  # ValueError: "I/O operation on closed file"
            for stream in (sys.stdout, sys.stderr):
                _silence_if_broken(stream)


def _silence_if_broken(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null if it is a pipe whose reader has gone."""
    try:
        fd = stream.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0)):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
    except (OSError, ValueError, AttributeError):  # no fileno (a notebook), no poll (Windows)
        pass


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (checkpoint first).

    A second Ctrl-C raises KeyboardInterrupt at once. Handlers can only be installed from the
    main thread; elsewhere (e.g. a notebook worker thread) Ctrl-C keeps its default meaning.
    The handler only sets a flag and prints through the console, which never raises: an
    exception here would surface in whatever line the loop was running, before the save.
    """

    def __init__(self, console: _Console):
        self.requested = False
        self.console = console
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: quit at once, without saving the current step")
        self.requested = True
        self.console.say(
            f"{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to quit now)"
        )

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
