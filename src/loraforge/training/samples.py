"""Sample generations during training (``train.sample_every`` / ``train.sample_prompts``).

Every ``sample_every`` steps and at the end, the model answers each prompt greedily (a user turn in
the tokenizer's chat template when it has one, as ``loraforge generate`` does) and the answers go to
``OUTPUT/samples.jsonl`` (one ``{"step", "prompt", "answer"}`` object per line) and the trackers.

Sampling leaves training exactly as it was: greedy decoding in eval mode (no dropout) under
``torch.no_grad``, inside ``torch.random.fork_rng`` so no random state moves, and the model back in
train mode afterwards; a run with samples gives bit-identical losses and weights to one without.
Only the main process generates (under DDP from the unwrapped model, so no collective runs);
``TrainConfig.validate`` refuses sampling under FSDP, where every process would have to run every
forward of the generation together.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .inference import generate


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer to ``prompt``: ``loraforge generate``'s (the same prompt template and
    stop tokens). It seeds the global generator, which the sampler's ``fork_rng`` restores."""
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.0)


class Sampler:
    """``at(step)``: at a multiple of ``train.sample_every`` (or with ``end``), the answers go to
    ``OUTPUT/samples.jsonl`` and the trackers. Does nothing when sampling is off or on the processes
    other than the main one."""

    def __init__(self, model, tokenizer, t, out: Path, trackers, is_main: bool, resume_step: int | None):
        self.model, self.tokenizer, self.prompts = model, tokenizer, list(t.sample_prompts)
        self.every, self.max_new_tokens = t.sample_every if is_main else 0, t.sample_max_new_tokens
        self.path, self.trackers = Path(out) / "samples.jsonl", trackers
        self.done: set[int] = set()
        if not self.every:
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
        if not self.every or step in self.done or not (end or step % self.every == 0):
            return []
        self.done.add(step)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=_cuda_devices(self.model)):
                answers = [answer(self.model, self.tokenizer, p, self.max_new_tokens) for p in self.prompts]
        finally:
            self.model.train(was_training)
        rows = [{"step": step, "prompt": p, "answer": a} for p, a in zip(self.prompts, answers)]
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.trackers is not None:
            self.trackers.samples(step, [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
        return rows


def _cuda_devices(model) -> list[int]:
    """The CUDA device the model is on (its generator is the one dropout draws from), if any."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
