"""Deterministic scorers for the demo's answers: does it sound like the character, is it still right.

Both are plain string checks, so a score is reproducible and explainable line by line:

* ``style``: an answer carries a character's traits when it contains at least ``min_markers``
  *distinct* markers of that character (for the pirate: "arr", "matey", "savvy", ...). A neutral
  answer ("Leo is at the park.") contains none, which is why the base scores ~0.
* ``content``: an answer is right when it contains every keyword of its question and none of the
  ``wrong`` words (the other people's values in a reading question: saying both "red" and "blue"
  to "what colour is Leo's drum?" is not an answer).

Scores are fractions of answers in [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from .data import PERSONAS


@cache
def _word(phrase: str) -> re.Pattern:
    # Letters-only boundaries: "\b" would treat the apostrophe in "'tis" as a boundary character.
    return re.compile(rf"(?<![a-z]){re.escape(phrase.lower())}(?![a-z])")


def has(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words, case-insensitively."""
    return _word(phrase).search(text.lower()) is not None


def markers_in(persona: str, text: str) -> list[str]:
    """The distinct trait markers of ``persona`` that ``text`` contains."""
    return [m for m in PERSONAS[persona].markers if has(text, m)]


def is_styled(persona: str, text: str, min_markers: int = 2) -> bool:
    return len(markers_in(persona, text)) >= min_markers


def style_score(persona: str, answers: Sequence[str], min_markers: int = 2) -> float:
    """Fraction of ``answers`` with at least ``min_markers`` distinct markers of ``persona``."""
    if not answers:
        return 0.0
    return sum(is_styled(persona, a, min_markers) for a in answers) / len(answers)


def is_correct(text: str, keywords: Sequence[str], wrong: Sequence[str] = ()) -> bool:
    return all(has(text, k) for k in keywords) and not any(has(text, w) for w in wrong)


def content_score(answers: Sequence[str], rows: Sequence[dict]) -> float:
    """Fraction of ``answers`` that are right for the dataset ``rows`` (with keywords/wrong)."""
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} questions")
    if not answers:
        return 0.0
    return sum(is_correct(a, r["keywords"], r.get("wrong", ())) for a, r in zip(answers, rows)) / len(rows)
