"""Evaluation during training: the eval loss (every process its share of the rows), early
stopping on it (``train.early_stopping_patience``) and the best weights kept as the result
(``train.keep_best``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import fsdp
from .config import TrainSection
from .data import collate, to_device
from .dist import all_reduce_sum
from .loss import CausalLMLoss
from .report import MetricsLog


def evaluator(model, core: CausalLMLoss, rows: list, batch_size: int, pad_id: int, dist, log, say):
    """``evaluate(step)``: the mean token loss over the eval rows (split over processes) and its
    perplexity, logged and said."""

    def evaluate(step: int) -> None:
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            mine = rows[dist.rank :: dist.world_size]
            n_rows = len(mine)
            if dist.fsdp:  # every process runs as many forwards (each one gathers shards from all)
                n_rows = math.ceil(len(rows) / dist.world_size)
            for i in range(0, n_rows, batch_size):
                part = mine[i : i + batch_size]
                batch = to_device(collate(part or rows[:1], pad_id), dist.device)
                loss_sum, n = core(**batch)
                if part:  # (an empty share ran a stand-in row, not counted)
                    total, count = total + loss_sum.item(), count + n.item()
        if dist.fsdp:  # the root (and layers not resharded after forward) keep their gathered weights
            fsdp.reshard_all(core)  # after a forward without backward
        total, count = all_reduce_sum(dist, total, count)
        model.train()
        loss = total / max(count, 1)
        ppl = math.exp(min(loss, 50))
        log.write(step=step, eval_loss=loss, eval_ppl=ppl)
        say(f"step {step}: eval loss {loss:.4f}, perplexity {ppl:.2f}")
        return loss

    return evaluate


class EarlyStopping:
    """``train.early_stopping_patience``: ``update(step, eval_loss)`` after each evaluation notes a
    new best (strictly lower) and sets ``stop`` once ``patience`` evaluations in a row brought none;
    ``save`` says a checkpoint is due (a new best, or the stop). After the loop's save, ``saved``
    names a new best's checkpoint in ``checkpoints/best.json``, which exempts it from pruning.
    ``train.keep_best`` tracks and saves the best the same way (without stopping when patience is
    0) and, at the end, :meth:`keep_best` puts the best checkpoint's weights back for the result.
    Off (never a save, never a stop) when neither is set. A resumed run recomputes its state from
    the metrics kept up to the checkpoint."""

    def __init__(
        self, t: TrainSection, out: Path, log: MetricsLog, resume_step: int | None, method: str = "lora"
    ):
        self.patience, self.keep, self.out = t.early_stopping_patience, t.keep_checkpoints, out
        self.keeps_best, self.result = t.keep_best, "model/" if method == "full" else "adapter/"
        self.active = bool(self.patience or self.keeps_best)
        self.best_loss, self.best_step, self.since_best, self.checkpoint = math.inf, None, 0, None
        self.stop = self.save = self.new_best = False  # save: a checkpoint is due (a new best, the stop)
        if self.active and resume_step is not None:
            for s, value in zip(*log.series("eval_loss")):
                self.update(s, value)
            self.save = self.new_best = False
            found = ckpt.best_checkpoint(out)
            self.checkpoint = found if found is not None and found.is_dir() else None

    def update(self, step: int, loss: float) -> None:
        if not self.active:
            return
        best = loss < self.best_loss
        if best:
            self.best_loss, self.best_step, self.since_best = loss, step, 0
        else:
            self.since_best += 1
            self.stop = bool(self.patience) and self.since_best >= self.patience
        self.new_best = best and step > 0  # (the loss before training: nothing to save)
        self.save = self.new_best or self.stop

    def saved(self, checkpoint: Path | None) -> None:
        """After a save: a new best's ``checkpoint`` (None on the processes other than the main
        one) becomes the named best."""
        new_best, self.save, self.new_best = self.new_best, False, False
        if new_best and checkpoint is not None:
            ckpt.mark_best(self.out, checkpoint, self.best_step, self.best_loss)
            self.checkpoint = checkpoint
            for stale in ckpt.prunable(self.out, self.keep):  # the previous best, now unprotected
                ckpt._remove(stale)

    def results(self, step: int, say, dist=None, restore=None) -> dict:
        """The results' best_* and early_stopped; with keep_best also :meth:`keep_best`'s (every
        process calls this at the end, with ``dist`` and ``restore`` for keep_best)."""
        if not self.active:
            return {}
        if self.stop:
            say(f"early stopping at step {step}: no new best eval loss in {self.patience} evaluations")
        where = self.checkpoint or "the start (no step improved on it; no checkpoint)"
        say(f"best eval loss {self.best_loss:.4f} at step {self.best_step}: {where}")
        return {
            "best_eval_loss": self.best_loss,
            "best_step": self.best_step,
            "best_checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "early_stopped": self.stop,
            **(self.keep_best(step, dist, restore, say) if self.keeps_best else {}),
        }

    def keep_best(self, step: int, dist, restore, say) -> dict:
        """``train.keep_best`` at the end of the run, on every process: unless the last step is the
        best, ``restore(checkpoint)`` puts the best checkpoint's weights into the model, so that
        the result (adapter/ or model/, saved next) holds them. The main process names
        the step (it wrote the checkpoints and best.json); an all-reduce tells the others, and
        waits for its last save. Returns the results' ``kept_best`` and ``result_step`` (whose
        weights the result holds)."""
        result = self.result
        named = ckpt.STEP_DIR.match(Path(self.checkpoint).name) if dist.is_main and self.checkpoint else None
        best = int(all_reduce_sum(dist, float(named.group(1)) if named else 0.0)[0])  # (the others add 0)
        if not best:
            say(f"keep_best: no step improved on the eval loss before training: {result} is the last step's")
            return {"kept_best": False, "result_step": step}
        last = "the last step's" if best == step else f"not the last step's ({step})"
        if best != step:
            restore(ckpt.checkpoint_root(self.out) / f"step-{best:06d}")
        say(f"keep_best: {result} holds step {best}'s weights (best eval loss {self.best_loss:.4f}), {last}")
        return {"kept_best": True, "result_step": best}
