"""Built-in models, tokenizer and data files: everything the quickstart and tests need, no download.

``builtin:tiny-llama`` is a transformers ``LlamaForCausalLM`` with random weights drawn from a
fixed seed (so an adapter trained on it loads onto the same weights anywhere), paired with a
byte-level BPE tokenizer trained deterministically on the bundled quickstart texts.
``builtin:quickstart/qa_train.jsonl`` names a file under ``loraforge/assets/``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"

# name -> LlamaConfig overrides. hidden 64, 2 layers: ~0.1 M parameters, a few ms per step.
MODELS = {
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Four times wider and deeper; still CPU friendly.
    "small-llama": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}
TOKENIZER_VOCAB = 512
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def is_builtin(path: str | None) -> bool:
    """``builtin:NAME`` of a model built here or a bundled data file (not a packaged pretrained
    model such as ``builtin:smollm2-135m-instruct``: that one is a directory once converted, see
    :mod:`loraforge.pretrained`)."""
    from ..pretrained import is_pretrained

    return isinstance(path, str) and path.startswith(PREFIX) and not is_pretrained(path)


def resolve_data_path(path: str) -> str:
    """``builtin:quickstart/qa_train.jsonl`` -> the bundled file; other paths unchanged."""
    if not is_builtin(path):
        return path
    full = ASSETS / path[len(PREFIX) :]
    if not full.is_file():
        known = sorted(str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*.jsonl"))
        raise FileNotFoundError(
            f"no bundled data file {path!r}; bundled: {', '.join(PREFIX + k for k in known)}"
        )
    return str(full)


def _corpus() -> list[str]:
    lines = []
    for file in sorted((ASSETS / "quickstart").glob("*_train.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            lines.extend(m["content"] for m in row["messages"]) if "messages" in row else lines.extend(
                row.values()
            )
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer():
    """The built-in byte-level BPE tokenizer (512 tokens, no chat template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), **SPECIAL_TOKENS)
    tok.model_max_length = 1024
    return tok


def build_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``LlamaForCausalLM`` for ``builtin:NAME`` with weights from ``seed`` (global RNG untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..pretrained import unknown_builtin

    key = name[len(PREFIX) :] if is_builtin(name) else name
    if key not in MODELS:
        raise ValueError(unknown_builtin(name))
    config = LlamaConfig(
        vocab_size=TOKENIZER_VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **MODELS[key],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config._name_or_path = PREFIX + key
    return model.to(dtype)
