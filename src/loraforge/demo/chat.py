"""``loraforge chat``: talk to a base model and switch persona adapters while it stays in memory.

    loraforge chat                       # the adapters `loraforge demo` wrote to runs/demo
    loraforge chat --demo DIR
    loraforge chat --base smollm2        # the characters `loraforge demo --base smollm2` trained
    loraforge chat --base DIR --adapter pirate=DIR --adapter butler=DIR

Commands: ``/persona NAME`` switches (only the active adapter changes: no weights are copied),
``/personas`` lists, ``/base`` turns adapters off, ``/help``, ``/quit`` (or Ctrl-D). Answers stream
token by token. With a pipe on stdin (``echo "What colour is snow?" | loraforge chat``) no prompt
is printed and each line gets one answer, so the chat can be scripted.

Each question is answered on its own (no history): the demo's characters were trained on
single-turn chats.

Chat template: each persona's prompt uses the template saved in its adapter directory (training
saves the tokenizer there: ``chat_template.jinja`` or ``tokenizer_config.json``), else the base
tokenizer's. When the base tokenizer has none, the base persona borrows the first adapter's. When
no file has one, chat uses loraforge's built-in ``<|user|>`` / ``<|assistant|>`` template, the one
``loraforge train`` uses for chat data on such a tokenizer, and says so on stderr at start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

from ..files import read_json_object

BASE_PERSONA = "base"  # the persona name for the bare base model (the layers' is "__base__")


def parse_args(argv):
    # Defaults are written in the help texts: ArgumentDefaultsHelpFormatter would add a second
    # "(default: None)" to the options whose default is "unset".
    p = argparse.ArgumentParser(
        prog="loraforge chat",
        description="Interactive chat with a base model and persona (LoRA) adapters. Commands: "
        "/persona NAME, /personas, /base, /help, /quit.",
    )
    p.add_argument(
        "--demo",
        default=None,
        help="output directory of `loraforge demo` (base + adapters) (default: runs/demo; "
        "runs/demo-smollm2 when the base is smollm2)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model directory, builtin:NAME or a .gguf file; 'smollm2' is SmolLM2-135M-Instruct "
        "(default: the demo's base)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT/loraforge adapter directory under a persona name (repeatable; replaces the demo's)",
    )
    p.add_argument("--persona", default=None, help="persona to start with (default: the first adapter)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest answer, in tokens (default: %(default)s)"
    )
    return p.parse_args(argv)


class ChatError(RuntimeError):
    pass


def resolve(args) -> tuple[Path, dict[str, Path]]:
    """(base dir, {persona: adapter dir}) from --base/--adapter, else from the demo's output."""
    adapters: dict[str, Path] = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ChatError(f"--adapter {item!r}: expected NAME=DIR")
        if name == BASE_PERSONA:
            raise ChatError(f"--adapter {item!r}: {BASE_PERSONA!r} is reserved for the base model")
        adapters[name] = Path(path)
    from .smollm2 import BASE as SMOLLM2
    from .smollm2 import DEFAULT_OUTPUT as SMOLLM2_DEMO
    from .smollm2 import is_smollm2

    base = (SMOLLM2 if is_smollm2(args.base) else args.base) if args.base else None
    demo = Path(args.demo or (SMOLLM2_DEMO if is_smollm2(args.base) else "runs/demo"))
    results = demo / "results.json"
    if base is None or not adapters:
        if results.exists():
            summary = read_json_object(results)
            base = base or summary["base"]
            if not adapters:
                for c in summary["settings"]["characters"]:
                    adapters[c] = demo / c / "lora" / "adapter"
        elif base is None:
            raise ChatError(
                f"no base model: {results} does not exist. Run `loraforge demo` first, or pass "
                "--base DIR [--adapter NAME=DIR ...]"
            )
    for name, path in adapters.items():
        if not (path / "adapter_config.json").exists():
            raise ChatError(f"adapter {name!r}: {path} holds no adapter_config.json")
    from ..pretrained import is_pretrained
    from ..pretrained import resolve as resolve_pretrained

    if is_pretrained(base):  # builtin:NAME or a .gguf file: its converted directory in the cache
        from ..model_files import ModelNotFoundError

        try:
            base = resolve_pretrained(str(base))
        except (ModelNotFoundError, ValueError, OSError) as e:  # missing package, bad file: one line
            raise ChatError(str(e)) from None
    base = Path(base)
    from ..training.config import ConfigError
    from ..training.modeling import check_causal_lm

    try:  # no such directory, an unreachable hub, an encoder: one line before anything loads
        check_causal_lm(str(base), key="--base")
    except ConfigError as e:
        raise ChatError(str(e)) from None
    return base, adapters


def saved_chat_template(directory: Path) -> str | None:
    """The chat template a tokenizer saved in ``directory``, or None.

    ``chat_template.jinja`` (transformers >= 4.47 writes it), else ``tokenizer_config.json``'s
    ``chat_template``: a string, or (several named templates) a list whose "default" entry is used.
    """
    jinja = directory / "chat_template.jinja"
    config = directory / "tokenizer_config.json"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        if not config.is_file():
            return None
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise ChatError(f"{jinja if jinja.is_file() else config}: cannot read the chat template ({e})") from e
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ChatError(f"{config}: chat_template must be a string or a list of named templates")
    return value or None


def chat_templates(
    tokenizer, base: Path, adapters: dict[str, Path]
) -> tuple[dict[str, str | None], str | None]:
    """({persona: template}, notice). None as a template: the tokenizer's own.

    Each adapter uses the template it was trained with (saved next to it), else the base's; the
    base persona uses the base tokenizer's, else the first adapter's, else loraforge's fallback.
    """
    from ..training.data import FALLBACK_CHAT_TEMPLATE

    own = {name: saved_chat_template(path) for name, path in adapters.items()}
    notice = None
    if getattr(tokenizer, "chat_template", None):
        default = None
    else:
        default = next((t for t in own.values() if t), None)
        if default is None:
            default = FALLBACK_CHAT_TEMPLATE
            notice = (
                f"note: neither the tokenizer in {base} nor an adapter directory holds a chat template; "
                "using loraforge's built-in <|user|>/<|assistant|> one (what `loraforge train` uses then)"
            )
    return {BASE_PERSONA: default} | {name: own[name] or default for name in adapters}, notice


@contextlib.contextmanager
def quiet_libraries():
    """Library warnings off while an answer streams: Python warnings and transformers' logger
    (e.g. a FutureWarning about a renamed argument) would print in the middle of the answer."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


class Chat:
    """The model with every adapter loaded, and which persona answers."""

    def __init__(self, base: Path, adapters: dict[str, Path], persona: str | None, max_new_tokens: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import loraforge as lf

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        # before the model loads: a missing or unreadable template fails in a second, not after it
        self.templates, self.notice = chat_templates(self.tokenizer, base, adapters)
        self.model = AutoModelForCausalLM.from_pretrained(base).eval()
        self.personas = list(adapters)
        for name, path in adapters.items():
            lf.load_adapter(self.model, path, adapter=name)
        self.max_new_tokens = max_new_tokens
        self.current = BASE_PERSONA
        if persona not in (None, BASE_PERSONA) and persona not in self.personas:
            raise ChatError(f"unknown persona {persona!r}; known: {', '.join(self.personas) or '(none)'}")
        self.switch(persona or (self.personas[0] if self.personas else BASE_PERSONA))

    def switch(self, name: str) -> float:
        """Make ``name`` answer; returns the switch time in ms (setting the active adapter)."""
        import loraforge as lf

        t0 = time.perf_counter()
        if name != BASE_PERSONA:
            lf.set_adapter(self.model, name)
        self.current = name
        return 1000 * (time.perf_counter() - t0)

    def reply(self, question: str, write) -> str:
        import loraforge as lf

        from .generation import stream_answer

        def go():
            with quiet_libraries():
                return stream_answer(
                    self.model,
                    self.tokenizer,
                    question,
                    write,
                    max_new_tokens=self.max_new_tokens,
                    chat_template=self.templates[self.current],
                )

        if self.current == BASE_PERSONA and self.personas:
            with lf.disable_adapters(self.model):
                return go()
        return go()


HELP = "commands: /persona NAME  /personas  /base  /help  /quit"


def repl(chat: Chat, stdin, stdout, interactive: bool) -> int:
    def out(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        out(f"personas: {', '.join(chat.personas) or '(none)'}; talking to {chat.current}. {HELP}\n")
    while True:
        try:
            if interactive:
                line = input(f"you ({chat.current})> ") + "\n"  # input(): readline editing
            else:
                line = stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:
            out("\n")
            return 0
        if not line:  # EOF (Ctrl-D, or the end of piped input)
            if interactive:
                out("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return 0
            if cmd == "/help":
                out(HELP + "\n")
            elif cmd == "/personas":
                for name in [*chat.personas, BASE_PERSONA]:
                    out(f"{'*' if name == chat.current else ' '} {name}\n")
            elif cmd == "/base":
                chat.switch(BASE_PERSONA)
                out("adapters off: the base model answers\n")
            elif cmd == "/persona":
                if arg not in chat.personas and arg != BASE_PERSONA:
                    out(f"unknown persona {arg!r}; known: {', '.join(chat.personas) or '(none)'}\n")
                else:
                    ms = chat.switch(arg)
                    out(f"now talking to {arg} (switched in {ms:.2f} ms)\n")
            else:
                out(f"unknown command {cmd!r}; {HELP}\n")
            continue
        out(f"{chat.current}> ")
        try:
            chat.reply(line, out)
        except KeyboardInterrupt:
            out(" [interrupted]")
        out("\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bars would clutter the chat screen
    try:
        base, adapters = resolve(args)
        chat = Chat(base, adapters, args.persona, args.max_new_tokens)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if chat.notice:
        print(chat.notice, file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return repl(chat, sys.stdin, sys.stdout, interactive)
