"""Choosing the next token, and the log-probabilities the API reports.

Every function works on one sequence's logits row, so a request's tokens do not depend on the
other requests in the step; a request's random draws come from its own generator (seeded
from ``seed``), so a seeded request gives the same text alone or in a crowd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What a request asks for (OpenAI's names; ``stop_token_ids``/``ignore_eos`` are vLLM's).

    ``temperature`` 0: greedy. ``logprobs`` k: the chosen token's log-probability and the k most
    likely alternatives per generated token; ``prompt_logprobs`` k: the same for each prompt
    token (completions' ``echo``). Log-probabilities are those of the model's distribution
    (log-softmax of the logits, before temperature and top-p)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def check(self) -> None:
        """ValueError naming the field for a value out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= 20):
                raise ValueError(f"{name} must be an integer in [0, 20], got {k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must hold non-empty strings")


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # the k most likely (id, text, logprob)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits (vocab,)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p  # the smallest set reaching top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_of(logprobs: torch.Tensor, token: int, k: int, text) -> TokenLogprob:
    """``token``'s entry from one row of log-probabilities, with the top ``k``."""
    top: list[tuple[int, str, float]] = []
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = [(int(i), text(int(i)), float(v)) for v, i in zip(values, ids)]
    return TokenLogprob(token, text(token), float(logprobs[token]), top)


def generator_for(params: SamplingParams, device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(int(params.seed))
    return g
