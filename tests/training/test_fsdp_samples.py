"""train.sample_every under train.distributed: fsdp: every process runs the greedy generation in
lockstep (each forward gathers the layers' shards from all of them), the main one writes; the
answers are those of a run without FSDP and training is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loraforge.training import TrainConfig, train
from loraforge.training.inference import generate, load_with_adapters

from .util import QA_EVAL, losses, subprocess_env, tiny_config

PROMPTS = ["What is 2+2?", "Name a colour."]
SAMPLES = {"max_steps": 4, "sample_every": 2, "sample_prompts": PROMPTS, "sample_max_new_tokens": 6}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.2}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_sample_every_is_accepted_with_fsdp(tmp_path):
    cfg = TrainConfig.load(tiny_config(tmp_path, train={**SAMPLES, "distributed": "fsdp"}))
    assert cfg.train.sample_every == 2 and cfg.train.distributed == "fsdp"


def test_fsdp_samples_equal_the_plain_runs_and_leave_training_unchanged(tmp_path):
    """FSDP in a group of one, no eval data (the first forward of the run is a generation's): the
    same answers at the same steps as without FSDP; the losses and adapter are those of the same
    FSDP run without samples, bit for bit (dropout 0.2: random numbers every step)."""
    train(tiny_config(tmp_path / "plain", lora=LORA, train=SAMPLES))
    train(tiny_config(tmp_path / "fsdp", lora=LORA, train={**SAMPLES, "distributed": "fsdp"}))
    quiet = {k: v for k, v in SAMPLES.items() if not k.startswith("sample")}
    train(tiny_config(tmp_path / "fsdp-quiet", lora=LORA, train={**quiet, "distributed": "fsdp"}))
    rows = read_jsonl(tmp_path / "fsdp" / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 2, 4) for p in PROMPTS]
    assert rows == read_jsonl(tmp_path / "plain" / "samples.jsonl")
    assert losses(tmp_path / "fsdp") == losses(tmp_path / "fsdp-quiet")
    a, b = adapter(tmp_path / "fsdp"), adapter(tmp_path / "fsdp-quiet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_fsdp_run_samples_only_what_is_missing(tmp_path):
    out = tmp_path / "out"
    section = {**SAMPLES, "distributed": "fsdp"}
    train(tiny_config(out, train={**section, "max_steps": 2}))  # its end (step 2) is sampled once
    train({**tiny_config(out, train=section), "resume": "auto"})
    assert [r["step"] for r in read_jsonl(out / "samples.jsonl")] == [0, 0, 2, 2, 4, 4]


@pytest.mark.parametrize("what", ["eval", "samples"])
def test_a_forward_without_backward_leaves_the_shards_in_place(tmp_path, what):
    """train.fsdp.reshard_after_forward: false keeps a layer gathered from its forward until its
    backward; an evaluation or a generation has no backward, and the checkpoint saved right after
    it found the gathered tensors in place of the shards the optimizer holds (a KeyError). Every
    unit is resharded after them now."""
    section = {"max_steps": 2, "distributed": "fsdp", "fsdp": {"reshard_after_forward": False}}
    if what == "eval":
        cfg = tiny_config(tmp_path / "out", data={"eval": QA_EVAL}, train={**section, "eval_every": 2})
    else:
        cfg = tiny_config(tmp_path / "out", train={**SAMPLES, **section})
    model, metrics = train(cfg)
    assert metrics["steps"] == 2 and (tmp_path / "out" / "checkpoints" / "step-000002").is_dir()
    assert all(hasattr(p, "to_local") for p in model.parameters())  # the shards (DTensors)


@pytest.mark.slow
@pytest.mark.parametrize("reshard", ["true", "false"])
def test_two_processes_sample_in_lockstep(tmp_path, reshard):
    """torchrun, 2 gloo processes, each holding half of every layer: the generation runs on both
    (with the layers resharded after each forward or kept gathered), samples.jsonl is written once
    with the answers of one process without FSDP, and the end's answers are `loraforge
    generate`'s on the saved adapter."""
    train(tiny_config(tmp_path / "one", train=SAMPLES))
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(tiny_config(tmp_path / "two", train=SAMPLES)).to_yaml())
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "loraforge", "train", str(config), "train.distributed=fsdp", "train.batch_size=2",
         f"train.fsdp.reshard_after_forward={reshard}"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_jsonl(tmp_path / "two" / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 2, 4) for p in PROMPTS]
    one = read_jsonl(tmp_path / "one" / "samples.jsonl")
    assert [r["answer"] for r in rows] == [r["answer"] for r in one]
    adapter_dir = str(tmp_path / "two" / "adapter")
    model, tokenizer = load_with_adapters("builtin:tiny-llama", {"default": adapter_dir}, device="cpu")
    for r in rows[-2:]:
        assert r["answer"] == generate(model, tokenizer, r["prompt"], max_new_tokens=6)


@pytest.mark.slow
def test_two_processes_resume_and_agree_on_what_is_sampled(tmp_path):
    """Resumed at step 2, whose answers the first run wrote: the main process, which alone reads
    samples.jsonl, tells the other that step 2 is done (were it to generate alone, the run would
    hang); each step's answers are in the file once."""
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(tiny_config(tmp_path / "out", train=SAMPLES)).to_yaml())
    for extra in (["train.max_steps=2"], ["resume=auto"]):
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "loraforge", "train", str(config), "train.distributed=fsdp", "train.batch_size=2",
             "train.dist_timeout=60", *extra],  # (a process left waiting fails in a minute)
            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "out" / "samples.jsonl")] == [0, 0, 2, 2, 4, 4]
