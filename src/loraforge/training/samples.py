"""Sample generations during training (``train.sample_every`` / ``train.sample_prompts``).

Every ``sample_every`` steps and at the end, the model answers each prompt greedily (a user turn in
the tokenizer's chat template when it has one, as ``loraforge generate`` does) and the answers go to
``OUTPUT/samples.jsonl`` (one ``{"step", "prompt", "answer"}`` object per line) and the trackers.

Sampling leaves training exactly as it was: greedy decoding in eval mode (no dropout) under
``torch.no_grad``, inside ``torch.random.fork_rng`` so no random state moves, and the model back in
train mode afterwards; a run with samples gives bit-identical losses and weights to one without.
Only the main process generates under DDP (from the unwrapped model, so no collective runs) and
writes. Under FSDP every forward gathers each layer's shards from every process, so every process
generates, in lockstep: the generation runs as the forward of the root unit (the loss module,
which holds the embeddings, final norm and head), so FSDP gathers as in a training forward, and
transformers' ``generate`` runs with ``synced_gpus`` (a process whose answer ended early keeps
running forwards until every process is done). Whether a step is sampled is the main process's
decision, told to the others (it alone reads ``samples.jsonl`` after a resume). Under FSDP's
mixed precision the answers are computed in that precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .dist import all_reduce_sum
from .fsdp import reshard_all
from .inference import generate


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer to ``prompt``: ``loraforge generate``'s (the same prompt template and
    stop tokens). It seeds the global generator, which the sampler's ``fork_rng`` restores."""
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.0)


class Sampler:
    """``at(step)``: at a multiple of ``train.sample_every`` (or with ``end``), the answers go to
    ``OUTPUT/samples.jsonl`` and the trackers. Does nothing when sampling is off, nor on the
    processes other than the main one except under FSDP (``root``: the root unit), where they
    generate along."""

    def __init__(self, model, tokenizer, t, out: Path, trackers, dist, resume_step: int | None, root=None):
        self.model, self.tokenizer, self.prompts = model, tokenizer, list(t.sample_prompts)
        self.dist, self.root = dist, root if dist.fsdp else None
        self.every = t.sample_every if dist.is_main or self.root is not None else 0
        self.max_new_tokens = t.sample_max_new_tokens
        self.path, self.trackers = Path(out) / "samples.jsonl", trackers
        self.done: set[int] = set()
        if not self.every or not dist.is_main:
            return
        kept = []
        if resume_step is not None and self.path.is_file():  # answers after the checkpoint: redone
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if row.get("step", 0) <= resume_step:
                    kept.append(row)
                    self.done.add(row["step"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def at(self, step: int, end: bool = False) -> list[dict]:
        if not self.every or not (end or step % self.every == 0):
            return []
        due = step not in self.done
        if self.root is not None and self.dist.enabled:  # the main process's decision, on every process
            due = all_reduce_sum(self.dist, float(due and self.dist.is_main))[0] > 0
        if not due:
            return []
        self.done.add(step)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=_cuda_devices(self.model)):
                answers = self._answers()
        finally:
            self.model.train(was_training)
        if not self.dist.is_main:
            return []
        rows = [{"step": step, "prompt": p, "answer": a} for p, a in zip(self.prompts, answers)]
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.trackers is not None:
            self.trackers.samples(step, [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
        return rows

    def _answers(self) -> list[str]:
        def run():
            return [answer(self.model, self.tokenizer, p, self.max_new_tokens) for p in self.prompts]

        return run() if self.root is None else through_root(self.root, self.model, run)


def through_root(root, model, fn):
    """``fn()`` run as the forward of the FSDP root unit ``root``, on every process: FSDP2 gathers
    the root's own weights in its pre-forward hook and each layer gathers its shards when ``fn``
    runs it, as in a training forward (a layer run outside its root's forward would make itself
    the root). ``model`` (the transformers model) is marked FSDP-managed meanwhile, which makes
    ``generate`` keep the processes in step (``synced_gpus``) when there are several."""
    root.forward = fn  # an instance attribute: nn.Module.__call__ runs it between FSDP's hooks
    model._is_fsdp_managed_module = True  # (transformers.distributed.fsdp.is_fsdp_managed_module)
    try:
        with torch.no_grad():
            return root()
    finally:
        del root.forward, model._is_fsdp_managed_module
        reshard_all(root)  # what a forward without backward leaves gathered


def _cuda_devices(model) -> list[int]:
    """The CUDA device the model is on (its generator is the one dropout draws from), if any."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
