"""Score models on a character's held-out questions, and show switching adapters at runtime.

Switching, two ways, on *one* base model in memory with every character's adapter loaded:

* **merge / unmerge** — ``W ← W + s·B·A`` into each adapted weight, answer with a plain model
  (no adapter cost per token), then ``W ← W − s·B·A``. Cost: one (out×r)·(r×in) product and an
  add per adapted matrix; we time it in ms and check that after every switch the base weights
  are back to the original (max |ΔW| printed).
* **mixed batch** — one forward for a batch whose row *i* uses adapter ``names[i]``: the base
  matmul runs once for the whole batch, each row adds its own low-rank term.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from . import scoring
from .generation import answer


def score(model, tokenizer, persona: str, rows: Sequence[dict], max_new_tokens: int = 32) -> dict:
    """Greedy answers to ``rows``' questions; style (for ``persona``) and content scores."""
    questions = [r["messages"][0]["content"] for r in rows]
    answers = answer(model, tokenizer, questions, max_new_tokens=max_new_tokens)
    return {
        "style": scoring.style_score(persona, answers),
        "content": scoring.content_score(answers, rows),
        "answers": answers,
    }


def load_base(base_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(base_dir)


def base_weights(model) -> dict[str, torch.Tensor]:
    """Copies of every adapted layer's base weight (to check merge/unmerge restores them)."""
    from loraforge.injection import lora_layers

    return {name: layer.base_layer.weight.detach().clone() for name, layer in lora_layers(model)}


def max_weight_change(model, original: dict[str, torch.Tensor]) -> float:
    from loraforge.injection import lora_layers

    return max(
        float((layer.base_layer.weight.detach() - original[name]).abs().max())
        for name, layer in lora_layers(model)
    )


def merge_switching(model, tokenizer, characters: Sequence[str], questions: Sequence[str], say) -> dict:
    """Answer ``questions`` as the base and as each character by merge/unmerge; time each switch."""
    import loraforge as lf

    original = base_weights(model)
    out = {"answers": {}, "merge_ms": {}, "unmerge_ms": {}}
    with lf.disable_adapters(model):
        out["answers"]["base"] = answer(model, tokenizer, questions)
    from tqdm.auto import tqdm

    for name in tqdm(characters, desc="merge / answer / unmerge", unit="character", leave=False):
        t0 = time.perf_counter()
        lf.merge(model, name)
        t1 = time.perf_counter()
        # Merged: the adapter is in W, so only the merged adapter may act; others stay off.
        lf.set_adapter(model, name)
        out["answers"][name] = answer(model, tokenizer, questions)
        t2 = time.perf_counter()
        lf.unmerge(model)
        t3 = time.perf_counter()
        out["merge_ms"][name] = 1000 * (t1 - t0)
        out["unmerge_ms"][name] = 1000 * (t3 - t2)
    out["max_abs_weight_change"] = max_weight_change(model, original)
    return out


def mixed_batch(model, tokenizer, names: Sequence[str], question: str) -> list[str]:
    """One batched generate call: row i answers ``question`` with adapter ``names[i]``."""
    import loraforge as lf

    with lf.adapter_batch(model, list(names)):
        return answer(model, tokenizer, [question] * len(names))
