"""The chat page (`GET /` of `loraforge serve`) in a real headless browser.

Debian's ``chromium`` driven by Playwright's sync API (``executable_path``: Playwright's own browser
download cannot be reached from CI). The characters are real: a short ``loraforge demo --quick``
trains a pirate and a butler adapter on the shipped tiny base (~40 s on 2 cores) into a temporary
directory once per module, and ``loraforge serve --demo DIR`` runs as a subprocess on 127.0.0.1 on a
free port. An answer is "a pirate answer" by the demo's own style scorer (``scoring.is_styled``:
at least two distinct pirate markers), and it must not also read as the butler's.

Skipped where playwright, chromium, fastapi or uvicorn is missing, except under ``make test``
(``LORAFORGE_REQUIRE_BROWSER=1``), which installs them: there a missing one fails, so CI cannot pass
while silently skipping the browser.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loraforge.demo.scoring import is_correct, is_styled

QUESTION, KEYWORD = "What colour is snow?", "white"
ANSWER_TIMEOUT_MS = 60_000
# Records #answer's text length at every DOM mutation the page makes: a streamed answer is seen at
# several lengths, an answer written once at its final length only.
OBSERVE = """() => {
  const answer = document.getElementById("answer");
  window.seen = [];
  new MutationObserver(() => window.seen.push(answer.textContent.length))
    .observe(answer, {childList: true, characterData: true, subtree: true});
}"""
DONE = """() => document.getElementById("answer").getAttribute("aria-busy") === "false"
  && !document.getElementById("send").disabled"""


def test_page_is_packaged_and_self_contained():
    """index.html, app.js and style.css ship in the package; the page names the ids the browser test
    uses and loads nothing from outside the server (no CDN, no absolute URL)."""
    static = importlib.resources.files("loraforge").joinpath("serving", "static")
    html = static.joinpath("index.html").read_text(encoding="utf-8")
    js = static.joinpath("app.js").read_text(encoding="utf-8")
    css = static.joinpath("style.css").read_text(encoding="utf-8")
    for element in ("model", "question", "send", "stop", "answer", "error", "api-key"):
        assert f'id="{element}"' in html
        assert re.search(rf'<label for="{element}"', html) or element in ("send", "stop", "answer", "error")
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["static/style.css", "static/app.js"]
    assert not re.search(r"https?:|[\"'(]//", html + js + css), "the page must load nothing from outside"
    assert sorted(re.findall(r'fetch\("([^"]+)"', js)) == ["v1/chat/completions", "v1/models"]


# --- the browser test ------------------------------------------------------------------------------------
def _chromium() -> str:
    """The chromium binary; skips (fails under LORAFORGE_REQUIRE_BROWSER=1) if anything is missing."""
    missing = [m for m in ("playwright", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    why = [f"{', '.join(missing)} not installed (pip install -e '.[test,serve]')"] if missing else []
    chromium = shutil.which("chromium")
    if chromium is None:
        why.append("chromium not on PATH (Debian: apt-get install --no-install-recommends chromium)")
    if why:
        why = "; ".join(why)
        if os.environ.get("LORAFORGE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LORAFORGE_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return chromium


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: chromium's sandbox refuses to run as root (CI); --headless=new: the full
        # browser without a display, not the old separate headless shell
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo_dir(browser, tmp_path_factory):
    """A pirate and a butler adapter, trained by `loraforge demo` (quick settings, no comparison runs)."""
    from loraforge.demo import main

    out = tmp_path_factory.mktemp("page") / "demo"
    assert main(["--quick", "--characters", "pirate,butler", "--no-compare", "--output", str(out)]) == 0
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict | str]:
    """(status, JSON body, or the text of a body that is not JSON)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@contextlib.contextmanager
def serve(demo: Path, log: Path, *extra: str):
    """`loraforge serve --demo DIR` on a free loopback port; yields its base URL once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "loraforge", "serve", "--demo", str(demo)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *extra]
    env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_API_KEY"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()  # SIGTERM: the server drains and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _console_errors(errors: list):
    def record(message):
        if message.type == "error" and "Failed to load" not in message.text:
            errors.append(message.text)

    return record


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    """The demo's characters served without an API key (shared by the tests that need no other flags)."""
    with serve(demo_dir, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def open_page(browser, url: str):
    """A fresh page (own localStorage) on ``url``; records every request and script error."""
    page = browser.new_context().new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    # (a failed fetch is logged as "Failed to load resource": the page shows those itself)
    page.on("console", _console_errors(page.errors))
    page.goto(url + "/")
    page.evaluate(OBSERVE)
    return page


def ask(page, model: str, question: str) -> tuple[str, list[int]]:
    """Pick ``model``, ask, wait for the answer to finish; (answer text, its lengths as it was written)."""
    page.select_option("#model", model)
    page.fill("#question", question)
    page.evaluate("() => { window.seen = []; }")
    page.click("#send")
    page.wait_for_function(DONE, timeout=ANSWER_TIMEOUT_MS)
    assert page.is_hidden("#error"), page.text_content("#error")
    return page.text_content("#answer"), page.evaluate("window.seen")


def assert_streamed(text: str, seen: list[int]) -> None:
    """The answer grew in front of the user: at least two distinct non-empty partial lengths before
    the final one, and lengths never shrinking."""
    partial = {n for n in seen if 0 < n < len(text)}
    assert len(partial) >= 2, f"answer {text!r} was not seen streaming: lengths {seen}"
    assert seen[-1] == len(text) and seen == sorted(seen), seen


def test_pick_the_pirate_ask_watch_it_stream_then_switch_to_the_butler(browser, server):
    url = server
    status, models = _get(url + "/v1/models")
    assert status == 200
    base = next(m["id"] for m in models["data"] if not m.get("parent"))
    page = open_page(browser, url)
    page.wait_for_function("() => !document.getElementById('model').disabled", timeout=30_000)
    # the picker: the characters by name, then the base labelled as the base
    options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent])")
    assert sorted(v for v, _ in options[:-1]) == ["butler", "pirate"] and options[-1][0] == base
    assert dict(options)["pirate"] == "pirate" and "base" in dict(options)[base]
    page.evaluate("() => { window.sameDocument = true; }")  # gone if the page reloads

    text, seen = ask(page, "pirate", QUESTION)
    assert_streamed(text, seen)
    assert is_styled("pirate", text) and not is_styled("butler", text), text
    assert is_correct(text, [KEYWORD]), text  # in character, and still right

    text, seen = ask(page, "butler", QUESTION)  # same page, no reload
    assert_streamed(text, seen)
    assert is_styled("butler", text) and not is_styled("pirate", text), text
    assert is_correct(text, [KEYWORD]), text

    text, _ = ask(page, base, QUESTION)  # the base has no character
    assert not is_styled("pirate", text) and not is_styled("butler", text), text
    assert is_correct(text, [KEYWORD]), text

    assert page.evaluate("window.sameDocument === true")
    assert not page.errors, page.errors
    outside = [u for u in page.requests if not u.startswith(url + "/")]
    assert not outside, f"the page fetched from outside the server: {outside}"


def test_api_key_is_sent_and_kept_and_errors_are_shown(browser, demo_dir, tmp_path):
    key = "page-test-key"
    # --adapter-root: unloading an adapter at runtime is allowed only with one
    with serve(demo_dir, tmp_path / "serve.log", "--api-key", key, "--adapter-root", str(demo_dir)) as url:
        page = open_page(browser, url)
        # without the key: the server's 401 message is shown and nothing can be sent
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        status, body = _get(url + "/v1/models")
        assert status == 401 and body["error"]["message"] in page.text_content("#error")
        assert page.is_disabled("#send") and page.is_visible("#api-key")  # the settings opened

        page.fill("#api-key", key)
        page.focus("#question")  # the key is taken on change
        page.wait_for_function("() => !document.getElementById('model').disabled", timeout=30_000)
        assert page.is_hidden("#error")
        assert page.evaluate("localStorage.getItem('loraforge.apiKey')") == key
        page.reload()
        page.evaluate(OBSERVE)
        assert page.input_value("#api-key") == key
        page.wait_for_function("() => !document.getElementById('model').disabled", timeout=30_000)
        text, _ = ask(page, "pirate", QUESTION)
        assert is_styled("pirate", text), text

        # an error from the completion request itself: the adapter is unloaded behind the page's back
        status, _ = _get(url + "/v1/unload_lora_adapter", key, {"lora_name": "pirate"})
        assert status == 200
        status, body = _get(
            url + "/v1/chat/completions",
            key,
            {"model": "pirate", "messages": [{"role": "user", "content": QUESTION}], "stream": True},
        )
        assert status == 404
        page.fill("#question", QUESTION)
        page.click("#send")
        page.wait_for_selector("#error:not([hidden])", timeout=ANSWER_TIMEOUT_MS)
        page.wait_for_function(DONE, timeout=ANSWER_TIMEOUT_MS)
        assert body["error"]["message"] in page.text_content("#error")
        assert page.text_content("#answer") == "" and page.is_enabled("#send") and page.is_disabled("#stop")
        assert not page.errors, page.errors


def test_sse_parser_reassembles_events_split_anywhere(browser):
    """The page's SSE reader, fed a stream cut mid-line, mid-field and between the CR and LF of a
    line end, with CRLF and CR line ends, a comment, a multi-line data field and a last event
    without its blank line."""
    static = importlib.resources.files("loraforge").joinpath("serving", "static")
    page = browser.new_page()
    page.set_content(static.joinpath("index.html").read_text(encoding="utf-8"))  # its fetches fail: fine
    page.add_script_tag(content=static.joinpath("app.js").read_text(encoding="utf-8"))
    pieces = [": keep-alive\n\nda", 'ta: {"a":', " 1}\r\n\r", "\ndata: x\r", "\ndata:y\n\r", "\rdata: [DONE]"]
    events = page.evaluate(
        """async (pieces) => {
          const body = new ReadableStream({start(c) {
            for (const p of pieces) c.enqueue(new TextEncoder().encode(p));
            c.close();
          }});
          const events = [];
          await readEvents(body, (data) => { events.push(data); });
          return events;
        }""",
        pieces,
    )
    assert events == ['{"a": 1}', "x\ny", "[DONE]"]
    page.close()


class SlowLink:
    """A loopback TCP proxy in front of the server that holds each server-sent event back for
    ``delay`` seconds once a connection has carried ``text/event-stream``: the answer trickles in
    slowly enough to press Stop while it runs. (Chromium's own network throttling delivers a
    throttled stream in one piece.) ``closed`` is set when the browser closes such a connection."""

    def __init__(self, upstream: str, delay: float = 0.3):
        self.upstream, self.delay = upstream, delay
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                host, port = self.upstream.rsplit("/", 1)[-1].split(":")
                server = socket.create_connection((host, int(port)))
                streaming = threading.Event()
                threading.Thread(target=self._up, args=(client, server, streaming), daemon=True).start()
                threading.Thread(target=self._down, args=(server, client, streaming), daemon=True).start()

    def _up(self, client, server, streaming):
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                server.sendall(data)
        if streaming.is_set():
            self.closed.set()
        for s in (client, server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _down(self, server, client, streaming):
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if b"text/event-stream" in data:
                    streaming.set()
                for piece in re.split(rb"(?<=\n\n)", data) if streaming.is_set() else [data]:
                    client.sendall(piece)
                    if piece.endswith(b"\n\n"):
                        time.sleep(self.delay)

    def close(self):
        self.listener.close()


def test_stop_ends_a_streaming_answer(browser, server):
    """Stop mid-answer: the part received stays, no error, Send is back, and the browser closed the
    connection (which is what frees the request's slot in the server)."""
    link = SlowLink(server)
    try:
        page = open_page(browser, link.url)
        page.wait_for_function("() => !document.getElementById('model').disabled", timeout=30_000)
        page.fill("#question", QUESTION)
        page.select_option("#model", "butler")
        page.click("#send")
        page.wait_for_function("() => document.getElementById('answer').textContent.length > 0")
        assert page.is_disabled("#send") and page.is_enabled("#stop")
        page.click("#stop")
        page.wait_for_function(DONE, timeout=10_000)
        partial = page.text_content("#answer")
        assert link.closed.wait(10), "the browser kept the stream open after Stop"
        assert page.text_content("#status") == "stopped" and page.is_hidden("#error")
        assert page.is_disabled("#stop")
        time.sleep(1)
        assert page.text_content("#answer") == partial  # nothing more was read
        full, _ = ask(page, "butler", QUESTION)  # the whole answer, still through the slow link
        assert 0 < len(partial) < len(full) and full.startswith(partial), (partial, full)
        assert not page.errors, page.errors
    finally:
        link.close()
