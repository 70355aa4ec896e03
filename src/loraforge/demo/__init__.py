"""``loraforge demo``: a persona chatbot on one tiny pretrained base model, on a built-in default.

One LoRA adapter per character ("pirate", "butler", "bard"), trained with ``lf.train`` on bundled
data; for one character also a full fine-tune and a QLoRA run; one table that compares them;
runtime switching by merge/unmerge and by a mixed-adapter batch. See ``app.py`` for the steps
and the README's demo section for what it shows; ``smollm2.py`` for ``--base smollm2``, the same
characters on the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``loraforge demo`` (``argv`` without the program and command names)."""
    from .app import main as _main

    return _main(argv)


__all__ = ["main"]
