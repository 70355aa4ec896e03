"""`loraforge chat` on a base whose tokenizer has no chat template: it uses the template saved in
the adapter directory (what training writes there), falls back to loraforge's built-in one when no
file has a template (and says so), keeps library warnings out of the answers, and its --help
names each default once.

The base is the demo's tiny pretrained Llama saved *without* its chat template; it answers
"Snow is white." only when prompted in the template it was trained with, which the adapter
directory holds. The chat runs through its real entry point with scripted stdin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loraforge as lf
from loraforge.demo.app import SHIPPED_BASE
from loraforge.demo.chat import BASE_PERSONA, ChatError, chat_templates, saved_chat_template
from loraforge.demo.generation import answer
from loraforge.training.data import FALLBACK_CHAT_TEMPLATE

QUESTION = "What colour is snow?"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """base/ (no template), with_tpl/ (adapter + tokenizer with the template), bare/ (adapter
    only), and the greedy answers each setting must give, computed in-process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("chat-template")
    base, with_tpl, bare = root / "base", root / "with_tpl", root / "bare"
    shutil.copytree(SHIPPED_BASE, base, ignore=shutil.ignore_patterns("chat_template.jinja"))
    tok = AutoTokenizer.from_pretrained(base)
    assert not tok.chat_template  # the situation of the bug
    template = (SHIPPED_BASE / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["v_proj", "o_proj"]), adapter="p")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    for d in (with_tpl, bare):
        lf.save_adapter(model, d, adapter="p")
    tok.chat_template = template
    tok.save_pretrained(with_tpl)  # as training does: chat_template.jinja or tokenizer_config.json
    assert saved_chat_template(with_tpl) == template and saved_chat_template(bare) is None

    expected = {}
    for key, tpl in (("adapter", template), ("fallback", FALLBACK_CHAT_TEMPLATE)):
        tok.chat_template = tpl
        expected[key] = answer(model, tok, [QUESTION], max_new_tokens=16)[0]
        with lf.disable_adapters(model):
            expected[f"base/{key}"] = answer(model, tok, [QUESTION], max_new_tokens=16)[0]
    # prompted the way it was trained, the model answers; the fallback template is not that way
    assert expected["adapter"] == expected["base/adapter"] == "Snow is white.", expected
    assert expected["fallback"] != expected["adapter"]
    return {"base": base, "with_tpl": with_tpl, "bare": bare, "expected": expected}


def _chat(base, adapter, script, warnings_on=True):
    cmd = [sys.executable, "-m", "loraforge", "chat", "--base", str(base), "--max-new-tokens", "16"]
    cmd += ["--adapter", f"p={adapter}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if warnings_on:  # what a user's shell has: Python's default filters, transformers' default logging
        for k in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
            env.pop(k, None)
    # stderr into stdout: one stream, as on a terminal, so anything printed inside an answer shows
    return subprocess.run(
        cmd, input=script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180, env=env
    )


def test_adapter_template_is_used_and_the_screen_stays_clean(dirs):
    res = _chat(dirs["base"], dirs["with_tpl"], f"{QUESTION}\n/base\n{QUESTION}\n")
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()
    e = dirs["expected"]
    assert f"p> {e['adapter']}" in lines, res.stdout
    assert f"base> {e['base/adapter']}" in lines, res.stdout  # the base persona borrows it too
    for noise in ("Warning", "deprecated", "Traceback", "Loading weights", "note:"):
        assert noise not in res.stdout, res.stdout


def test_no_template_anywhere_falls_back_and_says_so(dirs):
    res = _chat(dirs["base"], dirs["bare"], f"{QUESTION}\n")
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "no" in notes[0] and "chat template" in notes[0], res.stdout
    assert str(dirs["base"]) in notes[0]
    assert f"p> {dirs['expected']['fallback']}" in lines, res.stdout


def test_help_names_each_default_once():
    res = subprocess.run(
        [sys.executable, "-m", "loraforge", "chat", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: [])" not in text, res.stdout
    for option, default in (
        ("--demo", "runs/demo"),
        ("--max-new-tokens", "64"),
        ("--base", "the demo's base"),
    ):
        block = text.split(f"{option} ", 2)[-1].split(" --", 1)[0]  # the option's help paragraph
        assert block.count("(default:") == 1 and default in block, block


class _Tok:
    def __init__(self, chat_template=None):
        self.chat_template = chat_template


def test_which_template_each_persona_uses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "chat_template.jinja").write_text("A")
    (b / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "B"}]}
        )
    )
    none = tmp_path / "none"
    none.mkdir()
    # no base template: the base persona borrows the first adapter's; each adapter keeps its own
    t, notice = chat_templates(_Tok(), Path("base"), {"a": a, "b": b, "n": none})
    assert t == {BASE_PERSONA: "A", "a": "A", "b": "B", "n": "A"} and notice is None
    # a base template: None means "the tokenizer's own"
    t, notice = chat_templates(_Tok("X"), Path("base"), {"a": a, "n": none})
    assert t == {BASE_PERSONA: None, "a": "A", "n": None} and notice is None
    t, notice = chat_templates(_Tok(), Path("base"), {"n": none})
    assert t == {BASE_PERSONA: FALLBACK_CHAT_TEMPLATE, "n": FALLBACK_CHAT_TEMPLATE} and "base" in notice


def test_unreadable_template_file_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatError, match="tokenizer_config.json"):
        saved_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ChatError, match="tokenizer_config.json.*chat_template"):
        saved_chat_template(tmp_path)


def test_a_missing_or_encoder_base_is_one_line_before_loading(tmp_path):
    from transformers import BertConfig


    encoder = tmp_path / "bert"
    encoder.mkdir()
    bert = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    bert.save_pretrained(encoder)
    (encoder / "model.safetensors").write_bytes(b"not weights: the config alone must refuse it")
    for base, expected in ((tmp_path / "nothing", "no such directory"), (encoder, "not a causal")):
        done = subprocess.run(
            [sys.executable, "-m", "loraforge", "chat", "--base", str(base)],
            input="hi\n/quit\n",
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: --base: {base}") and expected in done.stderr
        assert done.stderr.count("\n") == 1
