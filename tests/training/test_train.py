"""``lf.train`` end to end, in process, on the built-in tiny model (a few steps each)."""

from __future__ import annotations

import json

import pytest
import torch

import loraforge as lf
from loraforge.training import ConfigError, TrainConfig, train

from .util import QA_EVAL, QA_TRAIN, losses, tiny_config

CHAT = "builtin:quickstart/chat_train.jsonl"


def test_lora_run_writes_everything(trained_run):
    out = trained_run
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4] and evals[0]["eval_ppl"] > 1
    assert records[-1]["event"] == "end"
    # the final checkpoint holds the PEFT adapter too
    assert (out / "checkpoints" / "step-000004" / "adapter" / "adapter_config.json").is_file()


def test_adapter_loads_back_and_in_peft(trained_run):
    peft = pytest.importorskip("peft")
    from loraforge.training.builtin import build_model

    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = build_model("builtin:tiny-llama")
    lf.load_adapter(ours, trained_run / "adapter")
    theirs = peft.PeftModel.from_pretrained(build_model("builtin:tiny-llama"), str(trained_run / "adapter"))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        base = build_model("builtin:tiny-llama")(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, base)  # training changed something


def test_same_seed_same_losses(tmp_path):
    cfg = tiny_config(tmp_path / "a", lora={"dropout": 0.1})
    _, m1 = train(cfg)
    _, m2 = train({**cfg, "output": str(tmp_path / "b")})
    assert m1["train_loss"] == m2["train_loss"]
    _, m3 = train({**cfg, "output": str(tmp_path / "c"), "train": {**cfg["train"], "seed": 2}})
    assert m3["train_loss"] != m1["train_loss"]


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    _, big = train(tiny_config(tmp_path / "a"))  # batch 4
    _, acc = train(tiny_config(tmp_path / "b", train={"batch_size": 1, "grad_accum": 4}))
    assert big["train_loss"] == pytest.approx(acc["train_loss"], abs=1e-5)


def test_loss_goes_down(tmp_path):
    cfg = tiny_config(
        tmp_path,
        data={"eval": QA_EVAL},
        train={"max_steps": 15, "batch_size": 8, "lr": 1e-2},
        lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
    )
    _, m = train(cfg)
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.2


def test_full_fine_tune_saves_a_model_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    model, m = train(tiny_config(tmp_path, method="full", train={"max_steps": 2, "lr": 1e-3}))
    assert m["trainable_params"] == m["total_params"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.randint(3, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["builtin", "dir"])
def test_qlora(tmp_path, tiny_model_dir, base):
    path = "builtin:tiny-llama" if base == "builtin" else str(tiny_model_dir)
    cfg = tiny_config(tmp_path, method="qlora", model={"path": path}, data={"eval": QA_EVAL})
    model, m = train(cfg)
    assert any(type(mod).__name__ == "Linear4bit" for mod in model.modules())
    assert m["final_eval_loss"] < m["initial_eval_loss"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_chat_packing_and_eval_fraction(tmp_path):
    cfg = tiny_config(
        tmp_path,
        data={"train": CHAT, "packing": True, "max_length": 128, "eval_fraction": 0.1},
        train={"max_steps": 2, "batch_size": 2},
    )
    _, m = train(cfg)
    assert m["initial_eval_loss"] is not None
    # the fallback chat template travels with the adapter for generation
    assert "<|assistant|>" in (tmp_path / "adapter" / "chat_template.jinja").read_text()


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    _, plain = train(tiny_config(tmp_path / "a"))
    _, ckpt = train(tiny_config(tmp_path / "b", train={"gradient_checkpointing": True}))
    assert plain["train_loss"] == pytest.approx(ckpt["train_loss"], abs=1e-5)


def test_existing_checkpoints_are_not_overwritten_silently(trained_run):
    cfg = tiny_config(trained_run)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg)


def test_resume_of_a_finished_run_is_a_no_op(trained_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained_run, out)
    cfg = tiny_config(out, data={"train": QA_TRAIN, "eval": QA_EVAL, "max_length": 48}, resume="auto")
    _, m = train(cfg)
    assert m["steps"] == 4 and losses(out) == losses(trained_run)


def test_train_accepts_yaml_path_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(TrainConfig.from_dict(tiny_config(tmp_path / "out")).to_yaml())
    _, m = lf.train(str(path), ["train.max_steps=1"])
    assert m["steps"] == 1
