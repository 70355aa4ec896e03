"""train.keep_best: the adapter (or model) written at the end holds the best checkpoint's weights
(lowest eval loss), not the last step's; with or without early stopping, across a resume, under
FSDP's sharded checkpoints and with 2 DDP processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loraforge.training import ConfigError, TrainConfig, train
from loraforge.training import checkpoint as ckpt

from .util import QA_EVAL, subprocess_env, tiny_config

# lr 0.2 on the tiny model: the eval loss falls until step 7, then rises to step 9 (test_samples.py)
RISING = {"lr": 0.2, "schedule": "constant", "max_steps": 9, "eval_every": 1, "keep_checkpoints": 1}
ADAPTER = "adapter/adapter_model.safetensors"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def best_of(out) -> tuple[int, float]:
    evals = [(r["step"], r["eval_loss"]) for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    return min(evals, key=lambda e: e[1])


def step_dir(out, step: int):
    return ckpt.checkpoint_root(out) / f"step-{step:06d}"


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"keep_best": True, "eval_every": 1}}, r"train.keep_best: needs eval data"),
        ({"data": {"eval": QA_EVAL}, "train": {"keep_best": True}}, r"keep_best: needs train.eval_every"),
    ],
)
def test_keep_best_needs_evaluations_during_the_run(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(tiny_config(tmp_path, **sections))


def test_the_final_adapter_is_the_best_checkpoints_bit_for_bit(tmp_path, capsys):
    """Without early stopping the run goes on to step 9 while the eval loss rises; adapter/ is the
    best checkpoint's adapter, byte for byte, and the returned model holds the same weights."""
    out = tmp_path / "out"
    model, metrics = train(tiny_config(out, data={"eval": QA_EVAL}, train={**RISING, "keep_best": True}))
    best_step, best_loss = best_of(out)
    assert metrics["steps"] == 9 and not metrics["early_stopped"] and 0 < best_step < 9
    assert metrics["kept_best"] is True and metrics["result_step"] == best_step == metrics["best_step"]
    best, last = step_dir(out, best_step), step_dir(out, 9)
    assert ckpt.list_checkpoints(out) == [best, last]  # the best kept past keep_checkpoints=1
    assert (out / ADAPTER).read_bytes() == (best / ADAPTER).read_bytes()
    config = "adapter/adapter_config.json"
    assert (out / config).read_text() == (best / config).read_text()
    assert not all(torch.equal(v, load_file(last / ADAPTER)[k]) for k, v in load_file(out / ADAPTER).items())
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert_same_tensors(trained, load_file(best / "trainable.safetensors"))
    printed = capsys.readouterr().out
    assert f"keep_best: adapter/ holds step {best_step}'s weights (best eval loss {best_loss:.4f})" in printed
    end = read_jsonl(out / "metrics.jsonl")[-1]
    assert end["event"] == "end" and end["kept_best"] is True and end["result_step"] == best_step


def test_without_keep_best_the_final_adapter_is_the_last_steps(tmp_path):
    """The control: the same run without keep_best ends with the last step's adapter."""
    out = tmp_path / "out"
    _, metrics = train(tiny_config(out, data={"eval": QA_EVAL}, train=RISING))
    assert "kept_best" not in metrics and "best_step" not in metrics
    assert (out / ADAPTER).read_bytes() == (step_dir(out, 9) / ADAPTER).read_bytes()


def test_with_early_stopping_the_best_is_kept_not_the_stop(tmp_path):
    out = tmp_path / "out"
    _, metrics = train(tiny_config(out, data={"eval": QA_EVAL}, train={
        **RISING, "early_stopping_patience": 2, "keep_best": True}))  # fmt: skip
    best_step, _ = best_of(out)
    assert metrics["early_stopped"] and metrics["steps"] == best_step + 2
    assert metrics["result_step"] == best_step
    assert (out / ADAPTER).read_bytes() == (step_dir(out, best_step) / ADAPTER).read_bytes()
    assert (out / ADAPTER).read_bytes() != (step_dir(out, metrics["steps"]) / ADAPTER).read_bytes()


def test_no_step_better_than_the_start_keeps_the_last_step(tmp_path, capsys):
    out = tmp_path / "out"
    _, metrics = train(tiny_config(out, data={"eval": QA_EVAL}, train={
        "lr": 1.0, "schedule": "constant", "max_steps": 2, "eval_every": 1, "keep_best": True}))  # fmt: skip
    assert metrics["best_step"] == 0 and metrics["kept_best"] is False and metrics["result_step"] == 2
    assert (out / ADAPTER).read_bytes() == (step_dir(out, 2) / ADAPTER).read_bytes()
    assert "keep_best: no step improved on the eval loss before training" in capsys.readouterr().out


def test_when_the_last_step_is_the_best_nothing_is_reloaded(tmp_path, monkeypatch):
    def no_reload(*args):
        raise AssertionError("reloaded")

    monkeypatch.setattr("loraforge.training.loop.weights_from", lambda *args: no_reload)
    out = tmp_path / "out"
    _, metrics = train(tiny_config(out, data={"eval": QA_EVAL}, train={
        **RISING, "max_steps": 4, "keep_best": True}))  # fmt: skip
    assert metrics["kept_best"] and metrics["result_step"] == 4 == best_of(out)[0]


def test_a_resumed_run_keeps_the_same_best(tmp_path):
    """Stopped at step 8 (after the best), resumed to 9: the same adapter as the straight run, the
    best checkpoint's (saved before the resume), bit for bit."""
    section = {**RISING, "keep_best": True}
    train(tiny_config(tmp_path / "straight", data={"eval": QA_EVAL}, train=section))
    out = tmp_path / "resumed"
    train(tiny_config(out, data={"eval": QA_EVAL}, train={**section, "max_steps": 8}))
    _, metrics = train({**tiny_config(out, data={"eval": QA_EVAL}, train=section), "resume": "auto"})
    best_step, _ = best_of(out)
    assert metrics["result_step"] == best_step == best_of(tmp_path / "straight")[0]
    assert (out / ADAPTER).read_bytes() == (tmp_path / "straight" / ADAPTER).read_bytes()
    assert (out / ADAPTER).read_bytes() == (step_dir(out, best_step) / ADAPTER).read_bytes()


def test_full_fine_tuning_keeps_the_best_model(tmp_path):
    out = tmp_path / "out"
    model, metrics = train(tiny_config(out, method="full", data={"eval": QA_EVAL}, train={
        "lr": 0.05, "schedule": "constant", "max_steps": 4, "eval_every": 1, "keep_best": True,
        "keep_checkpoints": 1}))  # fmt: skip
    best_step, _ = best_of(out)
    assert metrics["result_step"] == best_step < 4, "the eval loss must rise at the end for this test"
    saved = load_file(out / "model" / "model.safetensors")
    best = load_file(step_dir(out, best_step) / "trainable.safetensors")
    for name, tensor in best.items():  # (the saved model's names drop the wrapper's prefix, if any)
        key = next(k for k in (name, name.removeprefix("model."), f"model.{name}") if k in saved)
        assert torch.equal(saved[key], tensor), name


def test_fsdp_sharded_checkpoints(tmp_path):
    """FSDP in a group of one: the best is read back from its sharded checkpoint."""
    out = tmp_path / "out"
    _, metrics = train(tiny_config(out, data={"eval": QA_EVAL}, train={
        **RISING, "keep_best": True, "distributed": "fsdp"}))  # fmt: skip
    best_step, _ = best_of(out)
    assert metrics["result_step"] == best_step < 9
    assert_same_tensors(load_file(out / ADAPTER), load_file(step_dir(out, best_step) / ADAPTER))


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_keep_the_best(tmp_path, distributed):
    """torchrun, 2 gloo processes (micro-batch 2 each: the same global batch of 4): every process
    restores the best step that the main one names; adapter/ is the best checkpoint's."""
    cfg = tiny_config(tmp_path / "out", data={"eval": QA_EVAL}, train={
        **RISING, "keep_best": True, "batch_size": 2, "distributed": distributed})  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "loraforge", "train", str(config)],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    best_step, _ = best_of(out)
    end = read_jsonl(out / "metrics.jsonl")[-1]
    assert end["world_size"] == 2 and end["kept_best"] and end["result_step"] == best_step < 9
    assert_same_tensors(load_file(out / ADAPTER), load_file(step_dir(out, best_step) / ADAPTER))
    assert f"holds step {best_step}'s weights" in run.stdout
