"""`loraforge chat` driven as a person would: through a pseudo-terminal, and through a pipe.

The adapters here are made in the test (random low-rank factors on the shipped demo base), so
the chat is tested without training anything: what matters is that each persona answers with
its own adapter, /base turns them off, and the output streams.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
import torch

import loraforge as lf
from loraforge.demo.app import SHIPPED_BASE
from loraforge.demo.generation import answer, stream_answer

QUESTION = "What colour is snow?"


def _load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(SHIPPED_BASE).eval(), AutoTokenizer.from_pretrained(
        SHIPPED_BASE
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters with random B (so they change the output) saved in PEFT format."""
    root = tmp_path_factory.mktemp("chat")
    model, tok = _load_base()
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    paths = {}
    for seed, name in enumerate(["alpha", "beta"]):
        lf.add_adapter(model, name, cfg) if lf.list_adapters(model) else lf.inject(model, cfg, adapter=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 1.0)
        paths[name] = root / name
        lf.save_adapter(model, paths[name], adapter=name)
    # what each should answer (greedy), computed in-process
    expected = {}
    for name in paths:
        lf.set_adapter(model, name)
        expected[name] = answer(model, tok, [QUESTION])[0]
    with lf.disable_adapters(model):
        expected["base"] = answer(model, tok, [QUESTION])[0]
    assert len(set(expected.values())) == 3, expected  # the adapters really change the answer
    return paths, expected


def _cmd(paths):
    # 32 new tokens, as `answer` gives the expected texts (random adapters never say <|end|>)
    args = [sys.executable, "-m", "loraforge", "chat", "--base", str(SHIPPED_BASE), "--max-new-tokens", "32"]
    for name, p in paths.items():
        args += ["--adapter", f"{name}={p}"]
    return args


def _env():
    return dict(os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def test_piped_stdin(adapters):
    paths, expected = adapters
    lines = [QUESTION, "/persona beta", QUESTION, "/base", QUESTION, "/personas", "/persona nobody", "/quit"]
    script = "\n".join(lines + ["not read", ""])
    res = subprocess.run(_cmd(paths), input=script, capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert f"alpha> {expected['alpha']}" in lines  # the first adapter answers first
    assert f"beta> {expected['beta']}" in lines
    assert f"base> {expected['base']}" in lines
    assert any(line.startswith("now talking to beta") for line in lines)
    assert "* base" in lines and "  alpha" in lines  # /personas marks the current one
    assert any("unknown persona 'nobody'" in line for line in lines)
    assert not any("you (" in line for line in lines)  # no prompt when stdin is not a terminal
    assert "not read" not in res.stdout  # /quit stops reading


def test_eof_ends_a_piped_chat(adapters):
    paths, expected = adapters
    res = subprocess.run(
        _cmd(paths) + ["--persona", "beta"],
        input=QUESTION + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"beta> {expected['beta']}"


def _read_until(fd, needle: str, buf: list[str], timeout: float = 90.0) -> str:
    """Read the terminal until ``needle`` appears after what was read before; return the new text."""
    start, deadline = len("".join(buf)), time.monotonic() + timeout
    while needle not in "".join(buf)[start:]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; screen so far:\n{''.join(buf)}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"terminal closed before {needle!r}; screen:\n{''.join(buf)}")
            buf.append(chunk)
    return "".join(buf)[start:]


def test_through_a_pseudo_terminal(adapters):
    paths, expected = adapters
    master, slave = os.openpty()
    proc = subprocess.Popen(_cmd(paths), stdin=slave, stdout=slave, stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    buf: list[str] = []
    try:
        banner = _read_until(master, "you (alpha)> ", buf)
        assert "personas: alpha, beta" in banner and "/persona NAME" in banner
        os.write(master, f"{QUESTION}\r".encode())
        reply = _read_until(master, "you (alpha)> ", buf)
        assert f"alpha> {expected['alpha']}" in reply.replace("\r", "")
        os.write(master, b"/persona beta\r")
        assert "now talking to beta" in _read_until(master, "you (beta)> ", buf)
        os.write(master, f"{QUESTION}\r".encode())
        assert f"beta> {expected['beta']}" in _read_until(master, "you (beta)> ", buf).replace("\r", "")
        os.write(master, b"/base\r")
        _read_until(master, "you (base)> ", buf)
        os.write(master, f"{QUESTION}\r".encode())
        assert f"base> {expected['base']}" in _read_until(master, "you (base)> ", buf).replace("\r", "")
        os.write(master, b"/quit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_answers_stream_piece_by_piece(adapters):
    model, tok = _load_base()
    pieces: list[str] = []
    text = stream_answer(model, tok, QUESTION, pieces.append)
    assert len(pieces) > 2  # written as tokens arrive, not at the end
    assert "".join(pieces).strip() == text == answer(model, tok, [QUESTION])[0]


def test_missing_demo_output_is_a_clear_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "loraforge", "chat", "--demo", str(tmp_path / "none")],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert res.returncode == 2
    assert "Run `loraforge demo` first" in res.stderr
