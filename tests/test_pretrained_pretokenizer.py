"""The tokenizer of a converted GGUF model splits text as llama.cpp does for the file's
``tokenizer.ggml.pre`` (loraforge.pretrained): SmolLM2's ``smollm`` isolates every number
character before GPT-2's split, as its original tokenizer.json (Digits then ByteLevel) does, which
transformers' GGUF reader drops. A directory converted before that fix is repaired in place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from loraforge import pretrained  # noqa: E402
from tests.test_pretrained import write_gguf as gguf_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

# HuggingFaceTB/SmolLM2-135M(-Instruct)'s tokenizer.json "pre_tokenizer", as published
ORIGINAL = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
# A vocabulary whose merges cross digits ("1 2") and join a space to a digit ("Ġ 1"): splitting
# digits first or not gives different tokens.
TOKENS = ["<|endoftext|>", "<s>", "</s>", *"0123456789", *"abc", "Ġ", "12", "Ġ1", "ab"]
MERGES = ["1 2", "Ġ 1", "a b"]
TEXTS = ["12", " 12", "ab 1", "a12b 3", "ab  12 c"]


def write_gguf(path: Path, pre: str) -> Path:
    """test_pretrained's one-layer Llama GGUF with this vocabulary and ``tokenizer.ggml.pre`` = ``pre``."""
    return gguf_file(path, tokens=TOKENS, merges=MERGES, pre=pre, unk=False, chat_template=None)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAFORGE_CACHE", str(root))
    return root


def _pre_tokenizer(directory) -> dict:
    return json.loads((Path(directory) / "tokenizer.json").read_text())["pre_tokenizer"]


def _tokens(directory, text: str) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def _llama_cpp_ids(path, texts) -> list[list[int]]:
    """llama.cpp's own tokenization of ``texts`` with the vocabulary of the GGUF file ``path``."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [vocab.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    finally:
        vocab.close()


def _ids(directory, texts) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# -- tiny GGUF files --------------------------------------------------------------------------


def test_a_smollm_gguf_converts_to_the_original_digit_splitting_pre_tokenizer(cache, tmp_path):
    directory = pretrained.resolve(str(write_gguf(tmp_path / "digits.gguf", "smollm")))
    assert _pre_tokenizer(directory) == ORIGINAL
    assert _tokens(directory, "12") == ["1", "2"]  # GPT-2's split alone: ["12"]
    assert _tokens(directory, " 12") == ["Ġ", "1", "2"]  # GPT-2's split alone: ["Ġ", "12"]
    assert _tokens(directory, "ab 1") == ["ab", "Ġ", "1"]  # GPT-2's split alone: ["ab", "Ġ1"]
    info = json.loads((Path(directory) / pretrained.SOURCE_FILE).read_text())
    assert info["conversion"] == pretrained.CONVERSION


def test_a_gpt2_gguf_keeps_gpt2s_split(cache, tmp_path):
    """The control: a file whose pre-tokenizer is GPT-2's keeps merges across digits."""
    directory = pretrained.resolve(str(write_gguf(tmp_path / "gpt2.gguf", "gpt-2")))
    assert _pre_tokenizer(directory)["type"] == "ByteLevel"
    assert _tokens(directory, "12") == ["12"] and _tokens(directory, "ab 1") == ["ab", "Ġ1"]


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_the_converted_tokenizer_equals_llama_cpps_own(cache, tmp_path, pre):
    path = write_gguf(tmp_path / f"{pre}.gguf", pre)
    want = _llama_cpp_ids(path, TEXTS)
    assert _ids(pretrained.resolve(str(path)), TEXTS) == want


def _as_converted_before_the_fix(directory: Path) -> None:
    """What loraforge before conversion 2 left: GPT-2's split alone, no version recorded."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True}  # fmt: skip
    path.write_text(json.dumps(data))
    info = json.loads((directory / pretrained.SOURCE_FILE).read_text())
    del info["conversion"]
    (directory / pretrained.SOURCE_FILE).write_text(json.dumps(info))


def test_a_directory_converted_before_the_fix_is_repaired_in_place(cache, tmp_path, monkeypatch, capsys):
    path = write_gguf(tmp_path / "digits.gguf", "smollm")
    directory = Path(pretrained.resolve(str(path)))
    fresh = (directory / "tokenizer.json").read_bytes()
    weights = (directory / "model.safetensors").stat()
    _as_converted_before_the_fix(directory)
    assert _tokens(directory, "12") == ["12"]  # the old directory's tokenizer
    capsys.readouterr()

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_convert", no_conversion)
    assert pretrained.resolve(str(path)) == str(directory)
    assert "tokenizer updated" in capsys.readouterr().err
    assert (directory / "tokenizer.json").read_bytes() == fresh  # as a fresh conversion writes it
    assert _tokens(directory, "12") == ["1", "2"]
    now = (directory / "model.safetensors").stat()
    assert (now.st_ino, now.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)  # weights untouched
    info = json.loads((directory / pretrained.SOURCE_FILE).read_text())
    assert info["conversion"] == pretrained.CONVERSION and info["source"] == str(path)

    # once repaired, nothing is read or written again
    monkeypatch.setattr(pretrained, "_upgrade", no_conversion)
    assert pretrained.resolve(str(path)) == str(directory)
    assert capsys.readouterr().err == ""


def test_a_repair_killed_before_recording_its_version_is_finished_next_time(cache, tmp_path):
    """The tokenizer already repaired, the version not yet recorded: the next resolve records it."""
    path = write_gguf(tmp_path / "digits.gguf", "smollm")
    directory = Path(pretrained.resolve(str(path)))
    fresh = (directory / "tokenizer.json").read_bytes()
    info = json.loads((directory / pretrained.SOURCE_FILE).read_text())
    del info["conversion"]
    (directory / pretrained.SOURCE_FILE).write_text(json.dumps(info))
    pretrained.resolve(str(path))
    assert (directory / "tokenizer.json").read_bytes() == fresh
    assert pretrained._version(directory) == pretrained.CONVERSION


# -- the real model ---------------------------------------------------------------------------

# Numbers (ASCII: one token per digit either way, SmolLM2's vocabulary having no multi-digit token)
# and the number characters past ASCII after a space, where GPT-2's split alone differs.
REAL_TEXTS = [
    "12345",
    "In 2024, pi = 3.14159 and 1,000,000!",
    "Add ½ cup, then ¼ more.",
    "x ²³ and ① ② ③",
    "Chapter Ⅻ, page ٣٤",
    "café 日本語 😀  two  spaces\n\nnew line",
]


def test_smollm2s_tokenizer_splits_numbers_as_the_original(smollm2_dir):
    assert _pre_tokenizer(smollm2_dir) == ORIGINAL
    assert _tokens(smollm2_dir, "12345") == ["1", "2", "3", "4", "5"]
    assert _tokens(smollm2_dir, " ²³") == ["Ġ", "Â²", "Â³"]  # GPT-2's split alone: ["ĠÂ", "²", "Â³"]


def test_smollm2s_tokenizer_equals_llama_cpps_on_the_packaged_file(smollm2_dir):
    want = _llama_cpp_ids(pretrained.gguf_file("builtin:smollm2"), REAL_TEXTS)
    assert _ids(smollm2_dir, REAL_TEXTS) == want


def test_the_source_record_names_the_conversion_version(smollm2_dir):
    assert pretrained._version(Path(smollm2_dir)) == pretrained.CONVERSION
    assert os.path.isfile(Path(smollm2_dir) / "model.safetensors")
