"""Runs that must not lose work: a busy or unwritable output, Ctrl-C with a dead stdout pipe or
during start-up, NaN/Inf losses, a resume with a changed config, checkpoint leftovers, file modes."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

import loraforge as lf
from loraforge.training import ConfigError, TrainConfig, loop, train
from loraforge.training import checkpoint as ckpt
from loraforge.training.lock import LOCK_NAME, OutputLock, RunError

from .test_lock import hold
from .util import cli, losses, subprocess_env, tiny_config


def no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


def trainable(directory: Path) -> dict:
    return load_file(str(directory / "trainable.safetensors"))


# -- 3. one run per output ------------------------------------------------------------------------


def test_an_output_in_use_is_refused_before_anything_is_touched(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(out, train={"max_steps": 2}))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = hold(out)  # another process runs on it
    try:
        assert proc.stdout.readline().strip() == "locked"
        monkeypatch.setattr(loop, "prepare_model", no_model)
        for extra in ({"overwrite": True}, {"resume": "auto"}, {}):
            with pytest.raises(
                RunError, match=f"output {out} is in use by another run \\(pid {proc.pid} on "
            ):
                train(tiny_config(out, train={"max_steps": 4}, **extra))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # overwrite deleted nothing (the killed holder left its lock file)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != LOCK_NAME) == before


def test_the_lock_is_held_during_the_run_and_released_after(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real = loop.prepare_model

    def check_locked(*args, **kwargs):
        with pytest.raises(RunError, match="in use by another run"):
            OutputLock(out)
        seen.append(json.loads((out / LOCK_NAME).read_text())["pid"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "prepare_model", check_locked)
    train(tiny_config(out, train={"max_steps": 1}))
    assert seen == [os.getpid()] and not (out / LOCK_NAME).exists()


# -- 4. Ctrl-C ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_with_stdout_to_a_dead_pipe_still_saves_a_resumable_checkpoint(tmp_path):
    """``loraforge train run.yaml | tee log`` and Ctrl-C: tee exits first, so every print to stdout
    fails (EPIPE). The checkpoint must be saved anyway, and resume bit for bit."""
    steps = 30
    config = tmp_path / "run.yaml"
    cfg = tiny_config(tmp_path / "unused", lora={"dropout": 0.1}, train={"max_steps": steps})
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    train(TrainConfig.from_yaml(config, [f"output={tmp_path / 'reference'}"]))
    reference = losses(tmp_path / "reference")

    out = tmp_path / "piped"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraforge", "train", str(config), f"output={out}"],
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=err,
        )
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or len(losses(out)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended too early"
            time.sleep(0.005)
        proc.stdout.close()  # the reader is gone: writes to stdout now fail with EPIPE
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert rc == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted: training stopped at step" in stderr
    [saved] = ckpt.list_checkpoints(out)
    assert json.loads((saved / "state.json").read_text())["step"] == len(losses(out)) < steps
    train(TrainConfig.from_yaml(config, [f"output={out}", "resume=auto"]))
    assert losses(out) == reference


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """SIGINT while the model loads: no traceback, one line, 130, and the lock released."""
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(tiny_config(out)).to_yaml())
    script = (
        "import os, signal, sys, time\n"
        "import loraforge.training.loop as loop\n"
        "def loading(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "loop.prepare_model = loading\n"
        "from loraforge.cli import main\n"
        f"sys.exit(main(['train', {str(config)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130
    assert (
        done.stderr.strip() == "interrupted: Ctrl-C during start-up, before the first step: nothing was saved"
    )
    assert not out.exists()  # the lock is gone, and with it the directory it had created


# -- 5. NaN / Inf ----------------------------------------------------------------------------------------


def poison_training_call(monkeypatch, bad_calls: set[int]):
    """The loss (and so every gradient) of the given forward calls, counted from 1, becomes NaN."""
    calls = []

    class Poisoned(loop.CausalLMLoss):
        def forward(self, **batch):
            loss_sum, n = super().forward(**batch)
            calls.append(1)
            return (loss_sum * math.nan if len(calls) in bad_calls else loss_sum), n

    monkeypatch.setattr(loop, "CausalLMLoss", Poisoned)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_training_call(monkeypatch, {3})  # one micro-batch per step: step 3
    out = tmp_path / "run"
    cfg = tiny_config(out, train={"max_steps": 6, "save_every": 1, "keep_checkpoints": 5})
    with pytest.raises(RunError, match=r"^step 3: the loss is nan \(1 step\(s\) in a row") as err:
        train(cfg)
    assert str(err.value).count("\n") == 0 and "step-000002" in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert all(torch.isfinite(v).all() for v in trainable(out / "checkpoints" / "step-000002").values())
    assert not (out / "adapter").exists()  # no result from a run that failed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "stopped" and records[-2]["skipped"] is True


def test_a_single_nan_step_is_skipped_when_allowed(tmp_path, monkeypatch):
    poison_training_call(monkeypatch, {3})
    out = tmp_path / "run"
    cfg = tiny_config(
        out, train={"max_steps": 5, "save_every": 1, "keep_checkpoints": 5, "max_nonfinite_steps": 2}
    )
    model, metrics = train(cfg)
    assert metrics["steps"] == 5
    step2, step3 = (trainable(out / "checkpoints" / f"step-00000{s}") for s in (2, 3))
    assert all(torch.equal(step2[k], step3[k]) for k in step2)  # no update from the NaN step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_diverging_fp16_run_exits_non_zero_naming_the_step(tmp_path):
    """No monkeypatching: a float16 model with a learning rate of 1000 overflows within a few
    steps. The command used to finish with rc 0 and a NaN adapter."""
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    cfg = tiny_config(
        out, model={"dtype": "float16"}, train={"max_steps": 8, "lr": 1e3, "schedule": "constant"}
    )
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    done = cli("train", str(config), cwd=tmp_path)
    [line] = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert re.fullmatch(
        r"error: step \d+: the (loss|gradient norm) is (nan|inf|-inf) \(1 step\(s\) in a row.*", line
    )
    assert not (out / "adapter").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = lf.build_optimizer("adamw", model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(RunError, match="step 7: trainable tensor weight holds NaN/Inf"):
        ckpt.save_checkpoint(tmp_path, 7, model, opt, sched, {})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# -- 6. resume with a changed config -----------------------------------------------------------------


@pytest.fixture
def four_steps(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, train={"max_steps": 4, "schedule": "linear", "save_every": 2})
    train(cfg)
    return out, cfg


def resumed(cfg: dict, **train_changes) -> dict:
    return {**cfg, "resume": "auto", "train": {**cfg["train"], **train_changes}}


def test_resume_with_a_changed_learning_rate_is_refused(four_steps, monkeypatch):
    out, cfg = four_steps
    saved = (out / "config.yaml").read_text()
    monkeypatch.setattr(loop, "prepare_model", no_model)  # refused before the model loads
    with pytest.raises(
        ConfigError, match=r"differs from the checkpoint .* in train\.lr \(0\.01 -> 0\.001\);"
    ) as e:
        train(resumed(cfg, lr=1e-3, max_steps=8))
    assert "max_steps" not in str(e.value).split(";")[0]  # a longer run is fine
    assert (out / "config.yaml").read_text() == saved  # no saved config that disagrees with the run


def test_resume_with_safe_changes_continues(four_steps):
    out, cfg = four_steps
    _, metrics = train(resumed(cfg, max_steps=6, save_every=3, log_every=1, batch_size=2, grad_accum=2))
    assert metrics["steps"] == 6
    assert [p.name for p in ckpt.list_checkpoints(out)][-1] == "step-000006"


def test_resume_changes_apply_uses_the_new_learning_rate(four_steps):
    out, cfg = four_steps
    train(resumed(cfg, lr=1e-3, max_steps=8, resume_changes="apply"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    [event] = [r for r in records if r.get("event") == "resume"]
    assert event["step"] == 4 and event["changed"] == {"train.lr": [0.01, 0.001]}
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    factor = loop._lr_lambda(TrainConfig.from_dict(resumed(cfg, max_steps=8)).train, 8)
    assert lrs[5] == pytest.approx(1e-3 * factor(4)) and lrs[8] == pytest.approx(1e-3 * factor(7))
    assert TrainConfig.from_yaml(out / "config.yaml").train.lr == 1e-3


# -- 7. leftovers and file modes ---------------------------------------------------------------------------


def test_leftovers_of_killed_saves_and_prunes_are_removed_at_start(four_steps):
    out, cfg = four_steps
    root = out / "checkpoints"
    (root / "step-000001").mkdir()  # pruning killed after it deleted state.json
    (root / "step-000001" / "trainable.safetensors").write_bytes(b"x")
    (root / ".tmp-step-000003-999").mkdir()  # a save killed before its rename
    (root / ".old-step-000000-999").mkdir()  # a prune killed after its rename
    train(resumed(cfg))
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]


def test_a_failed_save_leaves_no_temporary_directory(tmp_path, monkeypatch):
    real = ckpt.save_file

    def disk_full_at_step_2(tensors, path, *args, **kwargs):
        if "step-000002" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", disk_full_at_step_2)
    out = tmp_path / "run"
    with pytest.raises(
        RunError, match=r"a write failed at step 2 \(\[Errno 28\] No space left on device"
    ) as e:
        train(tiny_config(out, train={"max_steps": 4, "save_every": 1}))
    assert str(e.value).endswith(f"newest complete checkpoint: {out / 'checkpoints' / 'step-000001'}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / LOCK_NAME).exists()


def test_pruning_never_leaves_a_step_folder_without_state(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 2)
    opt = lf.build_optimizer("adamw", model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # killed mid-delete
    ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0].startswith(".old-step-000001-") and names[1:] == ["step-000002"]
    monkeypatch.undo()
    assert ckpt.clean_partial(tmp_path) == [names[0]]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_adapter_files_follow_the_umask(tmp_path, umask):
    model = lf.inject(tiny_llama(), lf.LoraConfig(r=2, target_modules=["q_proj"]))
    before = os.umask(umask)
    try:
        lf.save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(before)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# -- 15. one-line errors before anything loads ----------------------------------------------------------


def test_cuda_without_cuda_is_one_line_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loop, "prepare_model", no_model)
    with pytest.raises(ConfigError, match=r"^train\.device: cuda: CUDA is not available here"):
        train(tiny_config(tmp_path / "run", train={"device": "cuda"}))
    assert not (tmp_path / "run").exists()


def test_unwritable_output_is_one_line_before_loading(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(loop, "prepare_model", no_model)
    with pytest.raises(RunError, match=r"^output .*/file/run: cannot write there \(Not a directory\)$"):
        train(tiny_config(tmp_path / "file" / "run"))


def test_cli_reports_a_busy_output_in_one_line(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(tiny_config(out)).to_yaml())
    proc = hold(out)
    try:
        assert proc.stdout.readline().strip() == "locked"
        done = cli("train", str(config), "overwrite=true", cwd=tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    [line] = done.stderr.strip().splitlines()
    assert done.returncode != 0 and line.startswith(
        f"error: output {out} is in use by another run (pid {proc.pid} "
    )
