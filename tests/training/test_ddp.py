"""torchrun with 2 processes (gloo on CPU) matches 1 process on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.training import TrainConfig, train

from .util import QA_EVAL, losses, subprocess_env, tiny_config


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def evals(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r["eval_loss"] for r in map(json.loads, lines) if "eval_loss" in r]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    steps = {"max_steps": 5, "save_every": 2, "eval_every": 3}
    cfg = tiny_config(tmp_path, data={"eval": QA_EVAL}, train=steps)
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())

    train({**cfg, "output": str(tmp_path / "one")})  # in this process: saves a start-up
    # 2 processes x micro-batch 1 x 2 accumulation steps = the same global batch of 4 rows
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "loraforge", "train", str(config), f"output={tmp_path / 'two'}",
            "train.batch_size=1", "train.grad_accum=2",
        ],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert max(abs(x - y) for x, y in zip(evals(tmp_path / "one"), evals(tmp_path / "two"))) < 1e-5
    assert "all-reduce per optimizer step" in two.stdout and "for full fine-tuning" in two.stdout
    # only rank 0 writes: the same files as a 1-process run, each metric written once
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == len(
        (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    )
