"""Score the demo's models on each character's held-out questions, and show switching adapters
at runtime (the scorers themselves, plain string checks, are in ``scoring``).

``Scorer`` loads the base once with every character's adapter and scores the base, each LoRA
adapter, the full fine-tune and the QLoRA run; then it switches characters on that one model.

Switching, two ways, on *one* base model in memory with every character's adapter loaded:

* **merge / unmerge** — ``W ← W + s·B·A`` into each adapted weight, answer with a plain model
  (no adapter cost per token), then ``W ← W − s·B·A``. Cost: one (out×r)·(r×in) product and an
  add per adapted matrix; we time it in ms and check that after every switch the base weights
  are back to the original (max |ΔW| printed).
* **mixed batch** — one forward for a batch whose row *i* uses adapter ``names[i]``: the base
  matmul runs once for the whole batch, each row adds its own low-rank term.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import data, scoring
from .generation import answer
from .runs import Settings, quant_config


def score(
    model, tokenizer, persona: str, rows: Sequence[dict], max_new_tokens: int = 32, extra: Sequence[str] = ()
) -> dict:
    """Greedy answers to ``rows``' questions; style (for ``persona``) and content scores.

    ``extra`` questions are answered in the same batched generate call and returned, unscored,
    under ``"extra"`` (the real-model demo's out-of-training questions).
    """
    questions = [r["messages"][0]["content"] for r in rows]
    both = answer(model, tokenizer, questions + list(extra), max_new_tokens=max_new_tokens)
    answers = both[: len(questions)]
    out = {
        "style": scoring.style_score(persona, answers),
        "content": scoring.content_score(answers, rows),
        "answers": answers,
    }
    if extra:
        out["extra"] = both[len(questions) :]
    return out


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


def merge_switching(
    model, tokenizer, characters: Sequence[str], questions: Sequence[str], say, max_new_tokens: int = 32
) -> dict:
    """Answer ``questions`` as the base and as each character by merge/unmerge; time each switch."""
    import loraforge as lf

    original = base_weights(model)
    out = {"answers": {}, "merge_ms": {}, "unmerge_ms": {}}
    with lf.disable_adapters(model):
        out["answers"]["base"] = answer(model, tokenizer, questions, max_new_tokens)
    from tqdm.auto import tqdm

    for name in tqdm(characters, desc="merge / answer / unmerge", unit="character", leave=False):
        t0 = time.perf_counter()
        lf.merge(model, name)
        t1 = time.perf_counter()
        # Merged: the adapter is in W, so only the merged adapter may act; others stay off.
        lf.set_adapter(model, name)
        out["answers"][name] = answer(model, tokenizer, questions, max_new_tokens)
        t2 = time.perf_counter()
        lf.unmerge(model)
        t3 = time.perf_counter()
        out["merge_ms"][name] = 1000 * (t1 - t0)
        out["unmerge_ms"][name] = 1000 * (t3 - t2)
    out["max_abs_weight_change"] = max_weight_change(model, original)
    return out


def mixed_batch(model, tokenizer, names: Sequence[str], question: str, max_new_tokens: int = 32) -> list[str]:
    """One batched generate call: row i answers ``question`` with adapter ``names[i]``."""
    import loraforge as lf

    with lf.adapter_batch(model, list(names)):
        return answer(model, tokenizer, [question] * len(names), max_new_tokens)


def eval_rows(s: Settings, character: str) -> list[dict]:
    """The held-out questions (with keywords) that the character's eval file was written from."""
    rows = data.persona_dataset(character, "eval", s.n_eval_reading, seed=s.seed)
    if s.n_eval_facts is None:
        return rows
    n_facts = len(data.split_facts()[1])  # held-out facts first, then reading questions
    return rows[: min(s.n_eval_facts, n_facts)] + rows[n_facts:]


def load_quantized_base(base_dir: Path, s: Settings):
    import loraforge as lf

    model = lf.load_model(str(base_dir), quantization=quant_config(s))
    model.eval()
    return model


class Scorer:
    """Holds the base model with every character's adapter loaded, for scoring and switching."""

    def __init__(self, base_dir: Path, s: Settings, results: dict, extra: Sequence[str] = ()):
        import loraforge as lf

        self.base_dir, self.s, self.results = base_dir, s, results
        self.extra = list(extra)  # more questions every model answers (see ``score``)
        self.model, self.tokenizer = load_base(base_dir)
        for c in s.characters:
            lf.load_adapter(self.model, results[(c, "lora")]["weights"], adapter=c)

    def all_scores(self, say) -> dict:
        """Scores keyed ``"<character>/<model>"`` (model: base, lora, full, base-nf4, qlora)."""
        from tqdm.auto import tqdm

        import loraforge as lf

        s, out = self.s, {}
        jobs = [("base", None)] + [("lora", c) for c in s.characters]
        if (s.compare_on, "full") in self.results:
            jobs += [("full", s.compare_on)]
        if (s.compare_on, "qlora") in self.results:
            jobs += [("qlora", s.compare_on)]
        rows = {c: eval_rows(s, c) for c in s.characters}
        answers_rows = []
        for kind, c in tqdm(jobs, desc="scoring", unit="model", dynamic_ncols=True):
            if kind == "base":
                # The questions are the same for every character; only the style check differs.
                with lf.disable_adapters(self.model):
                    res = self._score(self.model, s.characters[0], rows[s.characters[0]])
                for ch in s.characters:
                    out[f"{ch}/base"] = _restyle(res, ch, rows[ch])
                answers_rows += _answer_rows("base", res["answers"], rows[s.characters[0]])
            elif kind == "lora":
                lf.set_adapter(self.model, c)
                out[f"{c}/lora"] = self._score(self.model, c, rows[c])
                answers_rows += _answer_rows(f"{c}/lora", out[f"{c}/lora"]["answers"], rows[c])
            elif kind == "full":
                from transformers import AutoModelForCausalLM

                full = AutoModelForCausalLM.from_pretrained(self.results[(c, "full")]["weights"]).eval()
                out[f"{c}/full"] = self._score(full, c, rows[c])
                answers_rows += _answer_rows(f"{c}/full", out[f"{c}/full"]["answers"], rows[c])
                del full
            else:
                qmodel = load_quantized_base(self.base_dir, s)
                with lf.disable_adapters(qmodel) if lf.list_adapters(qmodel) else contextlib.nullcontext():
                    out[f"{c}/base-nf4"] = self._score(qmodel, c, rows[c])
                lf.load_adapter(qmodel, self.results[(c, "qlora")]["weights"], adapter=c)
                out[f"{c}/qlora"] = self._score(qmodel, c, rows[c])
                answers_rows += _answer_rows(f"{c}/qlora", out[f"{c}/qlora"]["answers"], rows[c])
                self.quantized_state_bytes = sum(
                    t.numel() * t.element_size() for t in qmodel.state_dict().values() if torch.is_tensor(t)
                )
                del qmodel
        out["answers_rows"] = answers_rows
        return out

    def _score(self, model, persona: str, rows: list[dict]) -> dict:
        return score(model, self.tokenizer, persona, rows, self.s.max_new_tokens, self.extra)

    def switching(self, questions: list[str]) -> dict:
        """Merge/unmerge switching with timings, then one mixed batch (base + every character)."""
        import loraforge as lf

        s = self.s
        lf.unmerge(self.model)
        res = merge_switching(self.model, self.tokenizer, s.characters, questions, print, s.max_new_tokens)
        names = ["__base__", *s.characters]
        t0 = time.perf_counter()
        mixed = mixed_batch(self.model, self.tokenizer, names, questions[1], s.max_new_tokens)
        res["mixed_ms"] = 1000 * (time.perf_counter() - t0)
        res["mixed_names"] = names
        res["mixed_answers"] = mixed
        one_at_a_time = [res["answers"]["base"][1]] + [res["answers"][c][1] for c in s.characters]
        res["mixed_matches_merged"] = mixed == one_at_a_time
        return res


def _restyle(res: dict, character: str, rows: list[dict]) -> dict:
    from . import scoring

    return {
        "style": scoring.style_score(character, res["answers"]),
        "content": scoring.content_score(res["answers"], rows),
        "answers": res["answers"],
    } | ({"extra": res["extra"]} if "extra" in res else {})


def _answer_rows(model: str, answers: list[str], rows: list[dict]) -> list[dict]:
    return [
        {"model": model, "question": r["messages"][0]["content"], "answer": a} for a, r in zip(answers, rows)
    ]


def score_all(base_dir: Path, s: Settings, results: dict, say, extra: Sequence[str] = ()):
    scorer = Scorer(base_dir, s, results, extra)
    return scorer, scorer.all_scores(say)
