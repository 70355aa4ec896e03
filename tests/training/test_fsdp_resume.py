"""FSDP checkpoints under torchrun (slow): kill -9 of a rank then --resume gives the uninterrupted
run bit for bit; another world size (2 -> 1, 2 -> 4, 1 -> 2) continues the same run; full
fine-tuning on 2 processes equals 1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as td
from safetensors.torch import load_file

from loraforge.training import TrainConfig, train

from .test_fsdp_checkpoint import STEPS, adapter, assert_same, qlora_config
from .util import losses, subprocess_env, tiny_config

# -- torchrun: 2 processes (and 4) ----------------------------------------------------------------


def torchrun(tmp_path: Path, n: int, cfg: dict, *overrides: str, wait: bool = True):
    config = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
        "-m", "loraforge", "train", str(config), *overrides,
    ]  # fmt: skip
    kw = dict(cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return subprocess.Popen(cmd, **kw)
    done = subprocess.run(cmd, timeout=600, **kw)
    assert done.returncode == 0, done.stdout[-3000:]
    return done


def workers(agent: int) -> dict[int, int]:
    """``{rank: pid}`` of the processes a torchrun agent started."""
    import psutil

    found = {}
    for child in psutil.Process(agent).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None:
            found[int(rank)] = child.pid
    return found


@pytest.mark.slow
def test_kill_9_of_one_rank_then_resume_is_bit_exact(tmp_path):
    """2 processes, QLoRA with dropout: kill -9 of rank 1 after the step-4 checkpoint; torchrun
    fails; --resume on 2 processes gives the uninterrupted run's losses and adapter bit for bit."""
    pytest.importorskip("psutil")
    cfg = qlora_config(
        tmp_path / "unused", distributed="fsdp", max_steps=12, batch_size=2, keep_checkpoints=2
    )
    torchrun(tmp_path, 2, cfg, f"output={tmp_path / 'ref'}")
    reference = losses(tmp_path / "ref")
    assert len(reference) == 12

    out = tmp_path / "killed"
    proc = torchrun(tmp_path, 2, cfg, f"output={out}", wait=False)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-000004" / "state.json").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(workers(proc.pid)[1], signal.SIGKILL)
    said, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, said[-3000:]
    assert 4 <= len(losses(out)) < 12  # killed before the end

    resumed = torchrun(tmp_path, 2, cfg, f"output={out}", "resume=auto")
    assert "resumed from" in resumed.stdout
    assert losses(out) == reference
    assert_same(adapter(out), adapter(tmp_path / "ref"))


@pytest.mark.slow
def test_another_world_size_resumes_the_same_run(tmp_path):
    """A 2-process FSDP run (no dropout) equals a plain 1-process run (adapter within 1e-5); its
    step-2 checkpoint continues on 1 process (FSDP and plain) and on 4 (torchrun) with the same
    losses, and the 1-process run's on 2 (FSDP)."""
    cfg = tiny_config(
        tmp_path / "unused", method="qlora",
        train={"max_steps": STEPS, "save_every": 2, "keep_checkpoints": 3, "distributed": "fsdp"},
    )  # fmt: skip
    torchrun(tmp_path, 2, cfg, f"output={tmp_path / 'two'}", "train.batch_size=2")
    two = losses(tmp_path / "two")
    plain = {**cfg["train"], "distributed": "ddp"}
    train({**cfg, "output": str(tmp_path / "one"), "train": plain})  # one process, no FSDP
    assert two == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert_same(adapter(tmp_path / "two"), adapter(tmp_path / "one"), tol=1e-5)
    assert_same(
        adapter(tmp_path / "two"),
        load_file(str(tmp_path / "two/checkpoints/step-000006/adapter/adapter_model.safetensors")),
    )

    step2 = tmp_path / "two" / "checkpoints" / "step-000002"
    for distributed in ("fsdp", "ddp"):  # 2 -> 1, under FSDP and without
        out = tmp_path / f"to-one-{distributed}"
        shutil.copytree(step2, out / "checkpoints" / step2.name)
        train(
            {
                **cfg,
                "output": str(out),
                "resume": "auto",
                "train": {**cfg["train"], "distributed": distributed},
            }
        )
        assert losses(out) == pytest.approx(two[2:], abs=1e-5)
        assert_same(adapter(out), adapter(tmp_path / "two"), tol=1e-5)

    out = tmp_path / "to-four"  # 2 -> 4 (ranks 2 and 3 take the random state of ranks 0 and 1)
    shutil.copytree(step2, out / "checkpoints" / step2.name)
    torchrun(tmp_path, 4, cfg, f"output={out}", "resume=auto", "train.batch_size=1")
    assert losses(out) == pytest.approx(two[2:], abs=1e-5)
    assert_same(adapter(out), adapter(tmp_path / "two"), tol=1e-5)

    out = tmp_path / "one-to-two"  # 1 -> 2, from a single-process checkpoint (trainable.safetensors)
    step2_one = tmp_path / "one" / "checkpoints" / "step-000002"
    assert (step2_one / "trainable.safetensors").is_file()
    shutil.copytree(step2_one, out / "checkpoints" / step2_one.name)
    torchrun(tmp_path, 2, cfg, f"output={out}", "resume=auto", "train.batch_size=2")
    assert losses(out) == pytest.approx(losses(tmp_path / "one")[2:], abs=1e-5)
    assert_same(adapter(out), adapter(tmp_path / "one"), tol=1e-5)

    broken = tmp_path / "broken" / "checkpoints" / step2.name  # a shard missing: refused, not zeros
    shutil.copytree(step2, broken)
    (broken / "sharded" / "shard-00002-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(
        ValueError, match=r"in .*sharded, this model \(4, 64\): the sharded checkpoint is incomplete"
    ):
        train({**cfg, "output": str(broken.parent.parent), "resume": "auto"})
    if td.is_initialized():  # (the failed run's group of one)
        td.destroy_process_group()


@pytest.mark.slow
def test_full_fine_tuning_on_two_processes_equals_one(tmp_path):
    """method full under FSDP on 2 processes: OUTPUT/model (gathered) loads with transformers and
    equals a plain 1-process run's within 1e-5."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path / "one", method="full", train={"max_steps": 3, "lr": 1e-3})
    train(cfg)
    fsdp_two = [f"output={tmp_path / 'two'}", "train.distributed=fsdp", "train.batch_size=2"]
    torchrun(tmp_path, 2, cfg, *fsdp_two)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    assert_same(a, b, tol=1e-5)
