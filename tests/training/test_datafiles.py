"""Data files: every unreadable line is named ``file:line``, and ``check_data`` finds bad files
and rows from their first rows, before any model is loaded."""

from __future__ import annotations

import json

import pytest

from loraforge.training import DataError
from loraforge.training.config import DataSection
from loraforge.training.data import check_data, load_examples
from loraforge.training.datafiles import peek_rows

GOOD = (json.dumps({"prompt": "Q?\n", "completion": "A."}) + "\n").encode()


def both_checks(path, tokenizer, **data):
    """The early check and the full load must report the same problem."""
    cfg = DataSection(train=str(path), **data)
    messages = []
    for check in (
        lambda: check_data(cfg),
        lambda: load_examples(str(path), cfg, tokenizer, log=lambda s: None),
    ):
        with pytest.raises(DataError) as e:
            check()
        messages.append(str(e.value))
    return messages


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_a_non_utf8_line_names_file_and_line(tokenizer, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(GOOD + GOOD + b'{"prompt": "caf\xe9?", "completion": "x"}\n' + GOOD)
    for message in both_checks(path, tokenizer):
        assert message == f"{path}:3: not UTF-8 text (byte 0xe9 at column 16)"
    if name.endswith(".jsonl"):  # and skip_bad_rows skips it
        cfg = DataSection(train=str(path), skip_bad_rows=True)
        notes = []
        assert len(load_examples(str(path), cfg, tokenizer, log=notes.append)) == 3
        assert "skipped 1 bad rows" in notes[0]
        check_data(cfg)


def test_a_non_utf8_csv_line_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\nQ?,A.\ncaf\xe9,x\n")
    for message in both_checks(path, tokenizer):
        assert message == f"{path}:3: not UTF-8 text (byte 0xe9 at column 4)"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "Q?", "completion": "abc', "invalid JSON (Unterminated string starting at column 32)"),
        (b'{"prompt": "Q?\x01", "completion": "a"}', "invalid JSON (Invalid control character at column 15)"),
        (b'{"prompt": "Q?" "completion": "a"}', "invalid JSON (Expecting ',' delimiter at column 17)"),
        (b"[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_invalid_json_lines_read_plainly(tokenizer, tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + line + b"\n" + GOOD)
    for got in both_checks(path, tokenizer):
        assert got == f"{path}:2: {message}"  # no "at at"


def test_a_json_document_with_a_syntax_error_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "Q?", "completion": "A."},\n  {"prompt": "Q?"\n]\n')
    for message in both_checks(path, tokenizer):
        assert message == f"{path}:4: invalid JSON (Expecting ',' delimiter at column 1)"


def test_check_data_reads_only_the_first_rows_of_a_jsonl_file(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(GOOD * 5 + b"\xff not even text\n")  # a bad line after the sample
    rows, where = peek_rows(str(path), n=5)
    assert len(rows) == 5 and where == [f"{path}:{i}" for i in range(1, 6)]
    check_data(DataSection(train=str(path)), n=5)
    with pytest.raises(DataError, match=rf"^{path}:6: not UTF-8"):
        check_data(DataSection(train=str(path)), n=6)


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "{train}: data file not found"),
        ({"train": b""}, "{train}: no rows"),
        ({"train": GOOD + b'{"prompt": "Q?"}\n'}, "{train}:2: missing field 'completion'"),
        ({"train": b'{"question": "Q?"}\n'}, "{train}:1: cannot tell the data format"),
        (
            {"train": GOOD, "eval": GOOD + b'{"prompt": "Q?", "completion": 5}\n'},
            "{eval}:2: field 'completion'",
        ),
        ({"train": GOOD, "eval": None}, "{eval}: data file not found"),
    ],
)
def test_check_data_finds_missing_files_and_bad_rows(tmp_path, files, message):
    paths = {"train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl"}
    for key, content in files.items():
        if content is not None:
            paths[key].write_bytes(content)
    cfg = DataSection(train=str(paths["train"]), eval=str(paths["eval"]) if "eval" in files else None)
    with pytest.raises(DataError) as e:
        check_data(cfg)
    assert str(e.value).startswith(message.format(**paths))


def test_check_data_reads_every_format(tmp_path):
    import pandas as pd

    rows = [{"prompt": "Q?\n", "completion": "A."}, {"prompt": "Q?\n", "completion": ""}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(
        json.dumps({"prompt": ["Q?", "Q?"], "completion": ["A.", ""]}, indent=1)
    )
    expected = {"d.parquet": "row 2", "d.csv": "4", "d.json": "row 2", "cols.json": "row 2"}
    for name, where in expected.items():
        path = tmp_path / name
        with pytest.raises(DataError, match=rf"^{path}:{where}: field 'completion' is empty"):
            check_data(DataSection(train=str(path)))
        check_data(DataSection(train=str(path), skip_bad_rows=True))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read as parquet"):
        check_data(DataSection(train=str(tmp_path / "bad.parquet")))
    check_data(
        DataSection(train="builtin:quickstart/qa_train.jsonl", eval="builtin:quickstart/chat_eval.jsonl")
    )
