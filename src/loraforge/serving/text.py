"""Tokens to text for a streamed answer: incremental decoding, stop strings, chat templates."""

from __future__ import annotations

from pathlib import Path


class Detokenizer:
    """The text of one answer as its tokens arrive, sent in pieces that are final.

    Decodes the whole answer at each token (byte-level BPE tokens need not be whole characters,
    so decoding token by token could split a UTF-8 sequence) and holds back what could still
    change: an incomplete character at the end (decoded as U+FFFD) and any end of the text that
    is the beginning of a stop string. A stop string ends the answer and is not part of it."""

    def __init__(self, engine, params) -> None:
        self.decode = engine.decode
        self.stops = list(params.stop)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` already sent
        self.stopped = False

    def add(self, token: int, eos: bool = False) -> tuple[str, bool]:
        """(new final text, whether a stop string ended the answer). An EOS token adds no text."""
        if eos or self.stopped:
            return "", self.stopped
        self.ids.append(token)
        self.text = text = self.decode(self.ids)
        if self.stops:
            at = self._find_stop(text)
            if at is not None:
                self.text, self.stopped = text[:at], True
                piece = self.text[self.sent :]
                self.sent = max(self.sent, at)
                return piece, True
        end = len(text) - self._held(text)
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece, False

    def flush(self) -> str:
        """What was held back, at the end of the answer (nothing after a stop string)."""
        if self.stopped:
            return ""
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece

    def _find_stop(self, text: str) -> int | None:
        start = max(0, self.sent - self.longest)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        body = text[: len(text) - held]
        for k in range(min(self.longest - 1, len(body)), 0, -1):
            if any(s.startswith(body[-k:]) for s in self.stops):
                return held + k
        return held


def chat_template_of(directory: Path) -> str | None:
    """The chat template saved with an adapter (training saves its tokenizer there), or None.
    ValueError for an unreadable one."""
    from ..demo.chat import ChatError, saved_chat_template

    try:
        return saved_chat_template(Path(directory))
    except ChatError as e:
        raise ValueError(str(e)) from None
