"""files.atomic_write: whole files or nothing, with the umask's mode (also for saved models)."""

from __future__ import annotations

import os

import pytest

import loraforge as lf
from loraforge.files import atomic_write, atomic_write_text, dir_size, format_bytes, read_json_object
from loraforge.training.builtin import build_model


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def test_files_get_the_mode_open_gives(tmp_path, umask):
    atomic_write_text(tmp_path / "a.txt", "héllo")
    with open(tmp_path / "b.txt", "w") as f:
        f.write("x")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_saved_models_follow_the_umask(tmp_path, umask):
    lf.save_model(build_model("builtin:tiny-llama"), tmp_path / "model")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": "x\ty"}', r"invalid JSON \(Invalid control character at line 1, column 9\)$"),
        (b'{"a": ', r"invalid JSON \(Expecting value at line 1, column 7\)$"),
        (b"[1, 2]", "expected a JSON object, got list$"),
        (b'{"a": "\xe9"}', r"not UTF-8 text \(invalid continuation byte at byte 7\)$"),
    ],
)
def test_read_json_object_names_the_file_once(tmp_path, content, message):
    (tmp_path / "c.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'c.json'}: {message}") as info:
        read_json_object(tmp_path / "c.json")
    assert "at at" not in str(info.value)


def test_format_bytes_binary_and_si():
    assert [format_bytes(n) for n in (0, 1023, 1024, 68_608, 3.8 * 2**20, 5 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.0 KB",
        "67.0 KB",
        "3.8 MB",
        "5120.0 GB",
    ]
    assert format_bytes(1_183_744, si=True, digits=2) == "1.18 MB"
    assert format_bytes(999, si=True) == "999 B" and format_bytes(-2048) == "-2.0 KB"


def test_dir_size_counts_matching_files_below(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "c.json").write_bytes(b"x" * 3)
    assert dir_size(tmp_path) == 18 and dir_size(tmp_path, "*.safetensors") == 15
