"""Named chat templates and the ``data.chat_template`` setting.

``data.chat_template`` is one of

* ``tokenizer``: the tokenizer's own template (loraforge's ``<|role|>`` fallback when it has none,
  ``training.data.FALLBACK_CHAT_TEMPLATE``);
* ``chatml`` | ``llama3`` | ``mistral`` | ``zephyr``: the Jinja templates below, written to render
  as the official templates of those model families do;
* a path to a ``.jinja`` file (read as untrusted text: at most ``MAX_TEMPLATE_BYTES``, UTF-8, valid
  Jinja).

The chosen template is set on the tokenizer before the data is tokenized, so it is saved with the
adapter (``tokenizer.save_pretrained`` writes ``chat_template.jinja``) and ``loraforge generate``,
``chat`` and ``serve`` read it back from there. Rendering is always transformers' own
``tokenizer.apply_chat_template``; this module only chooses the text of the template.

Special tokens: a template's markers that the tokenizer has no token for (``llama3``'s
``<|start_header_id|>`` on SmolLM2's tokenizer, ``chatml``'s ``<|im_start|>`` on a tokenizer that
lacks it) are rendered as plain text, tokenized into several ordinary tokens. Training still works
and the completion-only mask is still right (it is found from character offsets); no token is added
and the embeddings keep their size, as axolotl does unless its ``tokens:`` / ``special_tokens:``
keys ask for new ones. ``missing_markers`` lists them so that the run can say so once.
"""

from __future__ import annotations

import re
from pathlib import Path

# ChatML as Qwen2 / SmolLM2 write it (without their default system prompt):
#   <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta-Llama-3-Instruct's template: the BOS token (<|begin_of_text|> on a Llama 3 tokenizer), then
#   <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
# with each message's content trimmed, as the official template does.
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral-7B-Instruct's template: <s>[INST] Hi [/INST]Hello</s>[INST] ... [/INST]
# Roles must alternate user/assistant (as the official one demands); a leading system message is
# put before the first user message's text (so every conversation prefix renders as a text prefix).
MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only system, user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# HuggingFaceH4/zephyr-7b-beta's template: <|user|>\nHi</s>\n<|assistant|>\nHello</s>\n
# (its <|user|> / <|assistant|> are plain text in Zephyr's own tokenizer too).
ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

NAMED = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "zephyr": ZEPHYR}
# The markers each named template needs as single tokens to render as its model family's does
# (the BOS / EOS ones come from the tokenizer itself).
MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
    "zephyr": (),
}
MAX_TEMPLATE_BYTES = 256 * 1024  # the largest official templates (tool use included) are ~20 KB
SETTINGS = "tokenizer | " + " | ".join(NAMED) + " | a path to a .jinja file"


def read_template_file(path: str | Path) -> str:
    """The text of a ``.jinja`` template file, checked as untrusted input (size, UTF-8, Jinja
    syntax). ValueError with one line naming the file."""
    path = Path(path).expanduser()
    if path.suffix != ".jinja":
        raise ValueError(f"{path}: expected {SETTINGS}")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ValueError(f"{path}: not a file")
        if size > MAX_TEMPLATE_BYTES:
            raise ValueError(f"{path}: {size} bytes; a chat template may have at most {MAX_TEMPLATE_BYTES}")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such chat template file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the chat template ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    if not text.strip():
        raise ValueError(f"{path}: the chat template file is empty")
    check_syntax(text, str(path))
    return text


def check_syntax(template: str, where: str) -> None:
    """ValueError naming ``where`` and the line when ``template`` is not valid Jinja, compiled as
    transformers compiles chat templates (its sandbox, with its ``{% generation %}`` tag); nothing
    is rendered here."""
    from jinja2 import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # (a private name: should it move, parse in the same kind of sandbox)
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_template = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse
    try:
        compile_template(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"{where}:{e.lineno}: not a valid Jinja template ({e.message})") from None


def resolve(setting: str) -> str | None:
    """The template text ``data.chat_template`` names, or None for ``tokenizer`` (keep the
    tokenizer's own). ValueError (one line) for an unknown name or a bad file."""
    setting = setting.strip()
    if setting == "tokenizer":
        return None
    if setting in NAMED:
        return NAMED[setting]
    if setting.endswith(".jinja"):
        return read_template_file(setting)
    raise ValueError(f"unknown chat template {setting!r}; expected {SETTINGS}")


def problem(setting: str) -> str | None:
    """Why ``setting`` is not a usable ``data.chat_template`` value, or None (for the config check,
    before anything is loaded)."""
    try:
        resolve(setting)
    except ValueError as e:
        return str(e)
    return None


def missing_markers(tokenizer, setting: str, template: str) -> list[str]:
    """The markers of ``template`` (the named template's, or every ``<|...|>`` literal of a file's)
    that ``tokenizer`` does not encode as one token: they are rendered as plain text."""
    if setting in MARKERS:
        markers = MARKERS[setting]
    else:
        markers = tuple(dict.fromkeys(re.findall(r"<\|[A-Za-z0-9_]+\|>", template)))
    return [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]


def apply_setting(tokenizer, setting: str, log=print) -> None:
    """Set the template ``setting`` names on ``tokenizer`` (nothing for ``tokenizer``), saying once
    which of its markers the tokenizer lacks (rendered as text; no token is added)."""
    template = resolve(setting)
    if template is None:
        return
    tokenizer.chat_template = template
    missing = missing_markers(tokenizer, setting.strip(), template)
    if missing:
        log(
            f"data: chat template {setting}: the tokenizer has no token for {', '.join(missing)}; they "
            "are rendered as plain text (several tokens each, learned like any text; no token is added, "
            "as in axolotl without tokens:). Generation still stops only at the tokenizer's EOS "
            f"({tokenizer.eos_token}) or the template's end-of-turn token when it is one"
        )


def turn_end_id(tokenizer, template: str | None = None) -> int | None:
    """The id of the token that ends an assistant turn in ``template`` (the tokenizer's own when
    None), when that marker is a single token: ``<|eot_id|>`` for llama3, ``<|im_end|>`` for chatml
    on a tokenizer that has it. Found by rendering a probe conversation with transformers and
    reading what follows the assistant's text; None when the template puts no such token there.
    Generation stops there as well as at EOS (a Llama 3 base's EOS is <|end_of_text|>, not
    <|eot_id|>)."""
    probe = "loraforge-probe-answer"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    except Exception:  # a template that refuses the probe (roles, tools): no extra stop token
        return None
    after = text[text.find(probe) + len(probe) :] if probe in text else ""
    marker = after.strip().split("\n")[0].strip() if after.strip() else ""
    if not marker:
        return None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != marker:
        return None
    return ids[0]


__all__ = [
    "CHATML",
    "LLAMA3",
    "MISTRAL",
    "NAMED",
    "ZEPHYR",
    "apply_setting",
    "missing_markers",
    "problem",
    "read_template_file",
    "resolve",
    "turn_end_id",
]
