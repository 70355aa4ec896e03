"""``loraforge serve`` as a command: bad flags and paths in one line, a real server process with
--demo and an API key from the environment, and SIGTERM: the running stream completes, new
connections are refused, exit code 0."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from loraforge.cli import main
from loraforge.demo.app import SHIPPED_BASE


def _env(**extra):
    return dict(
        os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no base model"),
        (["/nonexistent/base"], "/nonexistent/base"),
        ([str(SHIPPED_BASE), "--adapter", "x=/nonexistent"], "not an adapter directory"),
        ([str(SHIPPED_BASE), "--adapter", "=dir"], "expected NAME=DIR"),
        ([str(SHIPPED_BASE), "--adapter-root", "/nonexistent"], "--adapter-root"),
        (["--demo", "/nonexistent/demo"], "results.json does not exist"),
        ([str(SHIPPED_BASE), "--base", "other"], "two base models"),
    ],
)
def test_bad_paths_are_one_line_and_exit_2(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("flag", [["--max-loras", "0"], ["--port", "70000"], ["--quantize", "int3"]])
def test_bad_flags_exit_2(capsys, flag):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(SHIPPED_BASE), *flag])
    assert e.value.code == 2


def test_a_port_in_use_exits_1(capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert main(["serve", str(SHIPPED_BASE), "--port", str(taken.getsockname()[1])]) == 1
    finally:
        taken.close()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 127.0.0.1:") and "\n" not in err


def _start(args, env=None):
    cmd = [sys.executable, "-m", "loraforge", "serve", *args, "--port", "0", "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or _env())


def _banner(proc, timeout=90.0) -> list[str]:
    """The start-up lines (URL, models, curl example), read by a thread (a select() on a buffered
    text pipe can miss lines already in Python's buffer)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    got = []
    try:
        while len(got) < 3:
            got.append(lines.get(timeout=timeout).rstrip("\n"))
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"no banner (got {got}); stderr: {proc.stderr.read()}") from None
    return got


def test_an_adapter_that_does_not_fit_fails_the_start_in_one_line(tmp_path, adapter_dirs, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dirs["pirate"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | {"r": 7}))  # the weights have r=4
    code = main(
        ["serve", str(SHIPPED_BASE), "--adapter", f"bad={bad}", "--port", "0", "--log-level", "warning"]
    )
    out, err = capsys.readouterr()
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: adapter 'bad'"), err
    assert "listening" not in out


def test_demo_server_with_a_key_drains_on_sigterm(tmp_path, adapter_dirs):
    demo = tmp_path / "demo"
    for name in ("pirate", "butler"):
        shutil.copytree(adapter_dirs[name], demo / name / "lora" / "adapter")
    summary = {"base": str(SHIPPED_BASE), "settings": {"characters": ["pirate", "butler"]}}
    (demo / "results.json").write_text(json.dumps(summary))
    proc = _start(["--demo", str(demo)], env=_env(LORAFORGE_API_KEY="k3y"))
    try:
        listening, models, curl = _banner(proc)
        url = listening.split("listening on ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        assert models == "models: base (base), pirate, butler"
        assert curl.startswith(f"try: curl {url}/v1/chat/completions") and "$LORAFORGE_API_KEY" in curl
        assert "k3y" not in listening + models + curl

        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["base", "pirate", "butler"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()

        # a long streaming request, then SIGTERM in the middle of it
        body = json.dumps(
            {
                "model": "pirate",
                "prompt": "Once",
                "max_tokens": 100,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
        ).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"data: {" not in received:
            received += sock.recv(65536)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):  # no new connections while it drains
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        sock.settimeout(60)
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        assert b"data: [DONE]" in received
        events = [e for e in received.split(b"\r\n") if e.startswith(b"data: {")]
        assert json.loads(events[-1][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_4bit_base_serves_what_generate_says(server_factory, adapter_dirs):
    """--quantize nf4: the CLI's loader (loraforge.model_files.load_model) under the engine."""
    import argparse

    import loraforge as lf
    from loraforge.serving import cli
    from loraforge.serving.engine import Engine
    from loraforge.training.inference import generate

    flags = argparse.Namespace(device="cpu", dtype="float32", quantize="nf4")

    def make_engine(cfg):
        model, tok = cli.load(SHIPPED_BASE, flags)
        return Engine(model, tok, base_id=cfg.base_id, base_path=cfg.base_path)

    s = server_factory(adapters={"butler": adapter_dirs["butler"]}, make_engine=make_engine)
    got = s.client().completions.create(
        model="butler", prompt="Once upon a time", max_tokens=10, temperature=0
    )
    model, tok = cli.load(SHIPPED_BASE, flags)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    lf.load_adapter(model, adapter_dirs["butler"], adapter="butler")
    assert got.choices[0].text == generate(model, tok, "Once upon a time", max_new_tokens=10, chat=False)


def test_serve_is_a_listed_command(capsys):
    assert main([]) == 2
    assert "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--adapter",
        "--adapter-root",
        "--api-key",
        "--max-loras",
        "--max-concurrent-requests",
        "--max-input-tokens",
        "--max-total-tokens",
        "--quantize",
        "--demo",
    ):
        assert flag in text


def test_serving_leaves_gradients_on_in_the_callers_thread():
    """Grad mode is per thread: the engine's thread turns it off for itself, nobody else's
    (an in-process server left it off for every later test of the session)."""
    assert torch.is_grad_enabled()
