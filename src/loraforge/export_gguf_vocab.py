"""A Hugging Face tokenizer as GGUF metadata (``tokenizer.ggml.*``), as llama.cpp reads it.

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2, loraforge's built-in one) become
``tokenizer.ggml.model = "gpt2"`` with

- ``tokens``: the token strings by id, ``vocab_size`` of them (ids the tokenizer lacks are padded
  as ``[PAD<id>]``, user-defined), ``token_type``: 1 normal, 3 control (special added tokens),
  4 user-defined (other added tokens and pads);
- ``merges`` and the special token ids / ``add_bos_token`` / chat template through the ``gguf``
  package's own :class:`gguf.SpecialVocab`, read from the tokenizer saved to a temporary folder;
- ``pre``: llama.cpp's name for the pre-tokenizer's split rule, found from the tokenizer's
  ``pre_tokenizer`` (:func:`pre_tokenizer_name`); one llama.cpp does not know is refused, since
  llama.cpp would split the text otherwise than training did.

Other tokenizer families (SentencePiece models, WordPiece) are refused in one line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# llama.cpp's regexes for the byte-level BPE pre-tokenizers it knows (src/llama-vocab.cpp), keyed
# by the regex a tokenizer.json ``Split`` carries; a tokenizer with only ``ByteLevel(use_regex)``
# uses GPT-2's, one with ``Digits(individual_digits)`` first too is SmolLM's.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


class VocabError(ValueError):
    """The tokenizer cannot be written as llama.cpp vocabulary (one line)."""


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``; VocabError for a
    pre-tokenizer llama.cpp has no equivalent of."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in SPLITS:
            return SPLITS[pattern]
    raise VocabError(
        f"tokenizer pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]} has no llama.cpp "
        "equivalent known to loraforge (known: GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE)"
    )


def add_vocab(writer, tokenizer, vocab_size: int) -> None:
    """Write ``tokenizer`` (a transformers fast tokenizer) into ``writer`` (a ``gguf.GGUFWriter``)
    as llama.cpp's ``tokenizer.ggml.*`` keys and ``tokenizer.chat_template``."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise VocabError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer"))
    ):
        raise VocabError(
            f"tokenizer model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) is not a "
            "byte-level BPE (GPT-2 style) tokenizer; loraforge writes only those to GGUF"
        )
    pre = pre_tokenizer_name(spec)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    if max(by_id, default=-1) >= vocab_size:
        raise VocabError(
            f"tokenizer has token id {max(by_id)} but the model's vocabulary has {vocab_size} rows"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # (an embedding row no token uses: llama.cpp needs a name for each)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="loraforge-gguf-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise VocabError("tokenizer has no BPE merges")
    special.add_to_gguf(writer, quiet=True)


__all__ = ["VocabError", "add_vocab", "pre_tokenizer_name"]
