"""train.sample_every / sample_prompts (greedy answers in samples.jsonl, training unchanged) and
train.early_stopping_patience (stop on a rising eval loss, the best checkpoint kept and named)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loraforge.training import ConfigError, TrainConfig, train
from loraforge.training import checkpoint as ckpt
from loraforge.training import samples as samples_module
from loraforge.training.inference import generate, load_with_adapters

from .util import QA_EVAL, losses, tiny_config

PROMPTS = ["What is 2+2?", "Name a colour."]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_at_multiples_of_sample_every_and_at_the_end(tmp_path):
    out = tmp_path / "out"
    train(tiny_config(out, train={"max_steps": 5, "sample_every": 2, "sample_prompts": PROMPTS,
                                  "sample_max_new_tokens": 6}))
    rows = read_jsonl(out / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 2, 4, 5) for p in PROMPTS]
    assert all(isinstance(r["answer"], str) for r in rows)
    # the end's answers are the trained adapter's greedy answers, as `loraforge generate` gives them
    adapter = {"default": str(out / "adapter")}
    model, tokenizer = load_with_adapters("builtin:tiny-llama", adapter, device="cpu")
    for r in rows[-2:]:
        assert r["answer"] == generate(model, tokenizer, r["prompt"], max_new_tokens=6)
    assert rows[0]["answer"] != rows[-2]["answer"] or rows[1]["answer"] != rows[-1]["answer"]


def test_sampling_leaves_training_bit_identical(tmp_path, monkeypatch):
    """With LoRA dropout (random numbers every step), a run that samples at every step, whose
    generation here also draws random numbers, gives the same losses and adapter bit for bit."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.2}
    base = tiny_config(tmp_path / "plain", lora=lora, train={"max_steps": 3})
    train(base)
    original = samples_module.answer

    def answer_drawing_random_numbers(*args, **kwargs):
        torch.rand(7)  # what a sampling decoder would do; fork_rng must hide it
        return original(*args, **kwargs)

    monkeypatch.setattr(samples_module, "answer", answer_drawing_random_numbers)
    sampled = tiny_config(tmp_path / "sampled", lora=lora, train={
        "max_steps": 3, "sample_every": 1, "sample_prompts": PROMPTS, "sample_max_new_tokens": 3})
    train(sampled)
    assert len(read_jsonl(tmp_path / "sampled" / "samples.jsonl")) == 4 * len(PROMPTS)
    assert losses(tmp_path / "sampled") == losses(tmp_path / "plain")
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "sampled" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"sample_every": 2}, r"train.sample_prompts: train.sample_every is set"),
        ({"sample_every": -1}, r"train.sample_every: must be >= 0"),
        ({"sample_max_new_tokens": 0}, r"train.sample_max_new_tokens: must be > 0"),
        ({"early_stopping_patience": 2, "eval_every": 1}, r"train.early_stopping_patience: needs eval data"),
        ({"early_stopping_patience": -1}, r"train.early_stopping_patience: must be >= 0"),
    ],
)
def test_config_errors(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(tiny_config(tmp_path, train=section))


def test_early_stopping_needs_evaluations_during_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"train.early_stopping_patience: needs train.eval_every > 0"):
        TrainConfig.load(tiny_config(tmp_path, data={"eval": QA_EVAL}, train={"early_stopping_patience": 2}))


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_early_stopping_keeps_and_names_the_best_checkpoint(tmp_path, capsys, distributed):
    """lr 0.2 on the tiny model: the eval loss falls until step 7, then rises; patience 2 stops the
    run at step 9. The best checkpoint survives keep_checkpoints=1 and is named everywhere (also
    with FSDP's sharded checkpoints, here in a group of one process)."""
    out = tmp_path / "out"
    _, metrics = train(tiny_config(out, data={"eval": QA_EVAL}, train={
        "lr": 0.2, "schedule": "constant", "max_steps": 12, "eval_every": 1, "save_every": 1,
        "keep_checkpoints": 1, "early_stopping_patience": 2, "distributed": distributed}))
    evals = [(r["step"], r["eval_loss"]) for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert metrics["steps"] == best_step + 2 < 12 and metrics["early_stopped"] is True
    assert [s for s, _ in evals] == list(range(metrics["steps"] + 1))
    assert all(loss >= best_loss for s, loss in evals if s > best_step)
    best_dir = ckpt.checkpoint_root(out) / f"step-{best_step:06d}"
    assert metrics["best_step"] == best_step and metrics["best_eval_loss"] == best_loss
    assert metrics["best_checkpoint"] == str(best_dir)
    # kept despite keep_checkpoints=1, next to the last step's; nothing else
    last_dir = ckpt.checkpoint_root(out) / f"step-{metrics['steps']:06d}"
    assert ckpt.list_checkpoints(out) == [best_dir, last_dir]
    assert json.loads((ckpt.checkpoint_root(out) / "best.json").read_text())["checkpoint"] == best_dir.name
    end = read_jsonl(out / "metrics.jsonl")[-1]
    assert end["event"] == "end" and end["best_checkpoint"] == str(best_dir)
    printed = capsys.readouterr().out
    assert f"early stopping at step {metrics['steps']}" in printed
    assert f"best eval loss {best_loss:.4f} at step {best_step}: {best_dir}" in printed
    # the final adapter is the last step's; the best one is in its checkpoint
    last = load_file(out / "adapter" / "adapter_model.safetensors")
    stopped = load_file(ckpt.latest_checkpoint(out) / "adapter" / "adapter_model.safetensors")
    best = load_file(best_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(last[k], stopped[k]) for k in last)
    assert not all(torch.equal(last[k], best[k]) for k in last)


def test_no_step_better_than_the_start_names_no_checkpoint(tmp_path):
    _, metrics = train(tiny_config(tmp_path / "out", data={"eval": QA_EVAL}, train={
        "lr": 1.0, "schedule": "constant", "max_steps": 12, "eval_every": 1, "early_stopping_patience": 2}))
    assert metrics["early_stopped"] and metrics["best_step"] == 0 and metrics["best_checkpoint"] is None
    assert metrics["steps"] == 2


def test_a_resumed_run_stops_where_the_uninterrupted_one_does(tmp_path):
    """Early stopping's state (best, evaluations since) and the samples continue across a resume."""
    section = {"lr": 0.2, "schedule": "constant", "eval_every": 1, "early_stopping_patience": 2,
               "sample_every": 3, "sample_prompts": PROMPTS[:1], "sample_max_new_tokens": 3}
    _, straight = train(tiny_config(tmp_path / "straight", data={"eval": QA_EVAL},
                                    train={**section, "max_steps": 12}))
    out = tmp_path / "resumed"
    train(tiny_config(out, data={"eval": QA_EVAL}, train={**section, "max_steps": 8}))
    _, resumed = train({**tiny_config(out, data={"eval": QA_EVAL}, train={**section, "max_steps": 12}),
                        "resume": "auto"})
    keys = ("steps", "best_step", "best_eval_loss", "early_stopped")
    assert {k: resumed[k] for k in keys} == {k: straight[k] for k in keys}
    assert resumed["best_checkpoint"] == str(ckpt.checkpoint_root(out) / f"step-{straight['best_step']:06d}")
    # the same answers, plus those at the first run's end (step 8)
    rows = read_jsonl(out / "samples.jsonl")
    assert [r["step"] for r in rows] == [0, 3, 6, 8, 9]
    assert [r for r in rows if r["step"] != 8] == read_jsonl(tmp_path / "straight" / "samples.jsonl")
