"""Reading training-data files (JSONL, JSON, CSV, Parquet) into rows, with ``file:line`` for
every problem: a line that is not UTF-8 or not JSON, a file that cannot be parsed.

``read_rows`` reads a whole file (through the ``datasets`` library); ``peek_rows`` reads only its
first rows, cheaply, so that a run can check its data before loading a model.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import typing
from pathlib import Path

from . import builtin


class DataError(ValueError):
    """A problem with the data; the message starts with ``file:line:``."""


def _file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in kinds:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    return kinds[suffix]


def _text_lines(path: str):
    """(line number, text, problem) for each non-blank line of a file read as bytes: ``text`` is
    None and ``problem`` says why when the line is not UTF-8 (a BOM on the first line is dropped)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield i, None, f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                continue
            if line.strip():
                yield i, line, None


def _json_error(e: json.JSONDecodeError) -> str:
    """``Expecting value at column 5``; json's messages that end in "at" are not doubled."""
    msg = e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg
    return f"invalid JSON ({msg} at column {e.colno})"


def _parse_line(line: str) -> tuple[dict | None, str | None]:
    """(row, problem) for one JSONL line."""
    try:
        row = json.loads(line.rstrip("\r\n"))  # the line break is no part of the row
    except json.JSONDecodeError as e:
        return None, _json_error(e)
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, None


def _first_non_utf8_line(path: str) -> str | None:
    """``file:line: not UTF-8 text ...`` for the first such line of a text file, or None."""
    return next((f"{path}:{i}: {problem}" for i, _, problem in _text_lines(path) if problem), None)


def _line_numbers(path: str) -> list[str]:
    """``file:line`` of each row of a JSONL or CSV file (blank JSONL lines and CSV quoted
    newlines taken into account)."""
    if Path(path).suffix.lower() == ".jsonl":
        return [f"{path}:{i}" for i, _, _ in _text_lines(path)]
    out, start = [], 2
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # header
        for _ in reader:
            out.append(f"{path}:{start}")
            start = reader.line_num + 1
    return out


class _Locations:
    """Row index -> location string, computed on first use (only when there is something to report)."""

    def __init__(self, path: str):
        self.path, self._lines = path, None

    def __getitem__(self, i: int) -> str:
        if Path(self.path).suffix.lower() not in (".jsonl", ".csv"):
            return f"{self.path}:row {i + 1}"
        if self._lines is None:
            self._lines = _line_numbers(self.path)
        return self._lines[i] if i < len(self._lines) else f"{self.path}:row {i + 1}"


def _local_file(path: str) -> str:
    """The file behind ``path`` (``builtin:NAME`` resolved), or a DataError."""
    shown = path
    path = builtin.resolve_data_path(path)
    if not Path(path).is_file():
        raise DataError(f"{shown}: data file not found")
    return path


def read_rows(path: str, skip_bad_rows: bool = False) -> tuple[list[dict], typing.Sequence[str], int]:
    """Rows of a local file via the ``datasets`` library: (rows, locations, invalid rows skipped).

    When ``datasets`` cannot read a JSON / JSONL file (a line that is not valid JSON or UTF-8, or
    values whose types it cannot reconcile), the file is re-read here so that the bad line can be
    named (or skipped with ``skip_bad_rows``) and the rows' fields checked one by one.
    """
    import datasets

    path = _local_file(path)
    kind = _file_format(path)
    datasets.disable_progress_bars()
    try:
        # CSV cells are text: no guessing "1." is a float or "" is missing (it is empty).
        options = {}
        if kind == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
            features = datasets.Features({c: datasets.Value("string") for c in header})
            options = {"features": features, "keep_default_na": False}
        with _quiet("datasets"):  # its own error log would repeat what we report with the line
            ds = datasets.load_dataset(kind, data_files=path, split="train", **options)
        return list(ds), _Locations(path), 0
    except Exception as e:
        if kind != "json":
            bad_line = _first_non_utf8_line(path) if kind == "csv" else None
            raise DataError(bad_line or f"{path}: cannot read as {kind}: {e}") from e
    return _json_rows(path, skip_bad_rows)


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _json_rows(path: str, skip_bad_rows: bool, limit: int = 0) -> tuple[list[dict], list[str], int]:
    """(rows, locations, bad rows skipped) of a JSONL file, or of a ``.json`` file holding JSON
    lines or one document (a list of row objects, or an object of equal-length columns); the
    first ``limit`` rows only when ``limit`` > 0."""
    lines = _text_lines(path)
    first = next(lines, None)
    if first is None:
        return [], [], 0
    lines = itertools.chain([first], lines)
    if Path(path).suffix.lower() == ".jsonl" or first[1] is None or _parse_line(first[1])[1] is None:
        return _jsonl_rows(path, lines, skip_bad_rows, limit)
    raw = Path(path).read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(_first_non_utf8_line(path) or f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: {_json_error(e)}") from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        doc = [dict(zip(doc, values)) for values in zip(*doc.values())]  # columns -> rows
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a list of row objects or one JSON object per line")
    rows, where, skipped = [], [], 0
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            if not skip_bad_rows:
                raise DataError(f"{path}:row {i + 1}: expected a JSON object, got {type(row).__name__}")
            skipped += 1
            continue
        rows.append(row)
        where.append(f"{path}:row {i + 1}")
        if len(rows) == limit:
            break
    return rows, where, skipped


def _jsonl_rows(path: str, lines, skip_bad_rows: bool, limit: int = 0) -> tuple[list[dict], list[str], int]:
    """(rows, locations, bad lines skipped) of JSON lines given by ``_text_lines``; the first
    ``limit`` rows only when ``limit`` > 0."""
    rows, where, skipped = [], [], 0
    for i, line, problem in lines:
        row = None
        if problem is None:
            row, problem = _parse_line(line)
        if problem is not None:
            if not skip_bad_rows:
                raise DataError(f"{path}:{i}: {problem}")
            skipped += 1
            continue
        rows.append(row)
        where.append(f"{path}:{i}")
        if len(rows) == limit:
            break
    return rows, where, skipped


def peek_rows(path: str, n: int = 100, skip_bad_rows: bool = False) -> tuple[list[dict], list[str]]:
    """The first ``n`` rows of a data file and their locations, read without ``datasets`` (cheap:
    only the start of a JSONL / CSV / Parquet file is read; a ``.json`` document is parsed whole).
    Unreadable rows raise DataError (``file:line: why``) unless ``skip_bad_rows``."""
    path = _local_file(path)
    kind = _file_format(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
        except Exception as e:  # pyarrow's errors: not a parquet file, truncated footer, ...
            raise DataError(f"{path}: cannot read as parquet: {e}") from None
        rows = batch.to_pylist() if batch is not None else []
        return rows, [f"{path}:row {i + 1}" for i in range(len(rows))]
    if kind == "json":
        rows, where, _ = _json_rows(path, skip_bad_rows, n)
        return rows, where
    rows, where = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            start = 2
            for row in reader:
                rows.append(row)
                where.append(f"{path}:{start}")
                start = reader.line_num + 1
                if len(rows) == n:
                    break
    except UnicodeDecodeError:
        raise DataError(_first_non_utf8_line(path) or f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"{path}: cannot read as csv: {e}") from None
    return rows, where
