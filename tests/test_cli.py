"""The ``loraforge`` command line: help, train, quickstart, merge, generate, inspect, delegation."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

import loraforge as lf
from loraforge.cli import build_parser, main

QA_TRAIN, QA_EVAL = "builtin:quickstart/qa_train.jsonl", "builtin:quickstart/qa_eval.jsonl"


def tiny(output, **train):
    return {
        "model": {"path": "builtin:tiny-llama"},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": QA_TRAIN, "eval": QA_EVAL, "max_length": 48},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress_bar": False, **train},
        "output": str(output),
    }


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-run")
    lf.train(tiny(out))
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from loraforge.training.builtin import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("base")
    build_model("builtin:tiny-llama").save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


# -- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, options",
    [
        ("train", ["--resume", "KEY=VALUE", "train.lr", "lora.target_modules", "default: 'cosine'"]),
        ("quickstart", ["--output", "(default: runs/quickstart)"]),
        ("merge", ["--base", "--adapter", "--out", "--dtype", "(default: float32)"]),
        ("generate", ["--adapter", "--use", "--prompt", "--max-new-tokens", "(default: 64)", "--raw"]),
        ("inspect", ["path", "--json"]),
    ],
)
def test_help_lists_every_option_with_defaults(capsys, command, options):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, option
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[0] in text


def test_top_level_help_lists_commands(capsys):
    assert main([]) == 2
    text = capsys.readouterr().out
    for command in ("quickstart", "train", "merge", "generate", "inspect", "demo", "chat"):
        assert command in text


def test_python_dash_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "loraforge", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "quickstart" in done.stdout


# -- train and quickstart ---------------------------------------------------------------------------


def test_config_errors_exit_2_with_key_and_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: x.jsonl}\ntrain: {lr: high}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "train.lr" in err
    path.write_text("data: {train: x.jsonl}\n")
    assert main(["train", str(path), "lora.rank=4"]) == 2
    assert "'lora.rank'" in capsys.readouterr().err


def test_train_command_prints_before_and_after(tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "out")))
    assert main(["train", str(path), "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "eval loss before:" in out and "eval loss after:" in out and "tokens/s" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_quickstart_runs(tmp_path, capsys):
    args = ["model.path=builtin:tiny-llama", "train.max_steps=2", "train.eval_every=0"]
    args.append("train.progress_bar=false")
    assert main(["quickstart", "--output", str(tmp_path / "qs"), *args]) == 0
    out = capsys.readouterr().out
    assert "eval loss before:" in out and "eval loss after:" in out
    assert "loraforge generate --base builtin:tiny-llama" in out


# -- merge, generate, inspect --------------------------------------------------------------------


@pytest.mark.parametrize("base", ["dir", "builtin"])
def test_merge_gives_a_plain_model_with_adapter_logits(run_dir, base_dir, tmp_path, base):
    from transformers import AutoModelForCausalLM

    from loraforge.training.builtin import build_model

    source = str(base_dir) if base == "dir" else "builtin:tiny-llama"
    out = tmp_path / "merged"
    assert main(["merge", "--base", source, "--adapter", str(run_dir / "adapter"), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted = build_model("builtin:tiny-llama")
    lf.load_adapter(adapted, run_dir / "adapter")
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapted.eval()(ids).logits, merged.eval()(ids).logits
        base_logits = build_model("builtin:tiny-llama").eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-4)
    assert main(["merge", "--base", source, "--adapter", str(run_dir / "adapter"), "--out", str(out)]) == 2


def test_generate_base_and_adapter(run_dir, base_dir, capsys):
    args = ["generate", "--base", str(base_dir), "--adapter", f"qa={run_dir / 'adapter'}", "--use", "base,qa"]
    args += ["--prompt", "What is 2 plus 3?\n", "--max-new-tokens", "6"]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in first] == ["[base]", "[qa]"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == first  # greedy: deterministic
    assert main(["generate", "--base", "builtin:tiny-llama", "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert main(["generate", "--base", str(base_dir), "--use", "nope", "--prompt", "Hi"]) == 2


def test_prompt_uses_the_chat_template_when_there_is_one():
    from loraforge.training.builtin import build_tokenizer
    from loraforge.training.data import FALLBACK_CHAT_TEMPLATE
    from loraforge.training.inference import prompt_ids

    tok = build_tokenizer()
    raw = prompt_ids(tok, "Hello")
    assert tok.decode(raw) == "<s>Hello"
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    assert tok.decode(prompt_ids(tok, "Hello")) == "<s><|user|>\nHello\n<|assistant|>\n"
    assert prompt_ids(tok, "Hello", chat=False) == raw


def test_inspect(run_dir, base_dir, capsys):
    assert main(["inspect", str(run_dir / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "PEFT LoRA" in text and "r                  4" in text and "size on disk" in text
    assert "method             lora" in text
    assert main(["inspect", str(run_dir / "checkpoints" / "step-000003"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "checkpoint" and info["step"] == 3 and info["method"] == "lora"
    assert info["adapter"]["params"] == info["trainable"]["params"] > 0
    assert main(["inspect", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "training output" and info["finished"] and info["checkpoints"] == ["step-000003"]
    assert main(["inspect", str(base_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "model" and info["model_type"] == "llama" and info["params"] > 0
    assert main(["inspect", str(run_dir / "nope")]) == 2


# -- demo and chat are delegated -----------------------------------------------------------------


def test_demo_and_chat_are_delegated(monkeypatch):
    calls = []
    fake = types.ModuleType("loraforge.demo.chat")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "loraforge.demo.chat", fake)
    assert main(["chat", "--persona", "pirate", "--help"]) == 0
    assert calls == [["--persona", "pirate", "--help"]]


def test_missing_delegate_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "loraforge.demo", None)  # import fails
    assert main(["demo"]) == 2
    assert "'loraforge demo' is not available" in capsys.readouterr().err
