"""Killed and interrupted runs resume to the same per-step losses, bit for bit.

The runs that get killed or interrupted are subprocesses; the reference run and the resumed runs
happen in this process (all single-threaded, so they compute bit for bit alike)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from loraforge.training import TrainConfig, train
from loraforge.training.checkpoint import list_checkpoints

from .util import losses, subprocess_env, tiny_config

STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config (dropout on, so the RNG state matters) and the losses of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(
        root / "unused",
        lora={"dropout": 0.1},
        train={"max_steps": STEPS, "save_every": 4, "keep_checkpoints": 3},
    )
    path = root / "run.yaml"
    path.write_text(TrainConfig.from_dict(cfg).to_yaml())
    # Runs here and in the subprocesses are single-threaded, so they compute bit for bit alike.
    train(TrainConfig.from_yaml(path, [f"output={root / 'reference'}"]))
    reference = losses(root / "reference")
    assert len(reference) == STEPS
    return root, path, reference


def start(root: Path, config: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loraforge", "train", str(config), f"output={output}", *extra],
        cwd=root,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the test could stop it:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.005)


def steps_logged(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"loss"' in line for line in path.read_text().splitlines())


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(setup, monkeypatch):
    root, config, reference = setup
    out = root / "killed"
    proc = start(root, config, out)
    wait_for(lambda: (out / "checkpoints" / "step-000004" / "state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = steps_logged(out)
    assert 4 <= killed_at < STEPS
    newest = list_checkpoints(out)[-1]

    said = []
    monkeypatch.setattr(tqdm, "write", lambda s, *a, **k: said.append(s))
    train(TrainConfig.from_yaml(config, [f"output={out}", "resume=auto"]))  # a new run, from the files
    assert f"resumed from {newest} at step {int(newest.name[5:])}/{STEPS}" in said
    assert losses(out) == reference  # bit for bit: data order, dropout RNG, optimizer, schedule


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_then_resume_is_bit_identical(setup):
    root, config, reference = setup
    out = root / "interrupted"
    proc = start(root, config, out, "train.save_every=0")
    wait_for(lambda: steps_logged(out) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "saving a checkpoint" in output and "interrupted" in output
    [saved] = list_checkpoints(out)  # save_every=0: only the one made on Ctrl-C
    state = json.loads((saved / "state.json").read_text())
    assert state["step"] == steps_logged(out) < STEPS
    assert (saved / "adapter" / "adapter_model.safetensors").is_file()

    train(TrainConfig.from_yaml(config, [f"output={out}", "train.save_every=0", "resume=auto"]))
    assert losses(out) == reference
