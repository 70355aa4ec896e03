"""A process that dies, hangs or never joins makes the others stop with one clear line (bounded by
``train.dist_timeout``) instead of waiting forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as td

from loraforge.training import TrainConfig, train
from loraforge.training.dist import DistInfo, first_line, lost_contact, lost_contact_error
from loraforge.training.lock import RunError

from .test_fsdp_multinode import free_port
from .util import subprocess_env, tiny_config

GLOO_RESET = (
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:5832: Connection reset "
    "by peer. This is typically caused by a remote worker hanging or bugs in the application.\nmore"
)


def test_lost_contact_recognises_backend_errors():
    two, one = DistInfo(rank=1, world_size=2), DistInfo()
    assert lost_contact(two, RuntimeError(GLOO_RESET))
    assert lost_contact(two, td.DistNetworkError("anything"))
    assert lost_contact(two, RuntimeError("Timed out waiting 20000ms for recv operation to complete"))
    wrapped = ValueError("saving failed")
    wrapped.__cause__ = td.DistBackendError("NCCL communicator was aborted")
    assert lost_contact(two, wrapped)
    # not a peer: a bug, a shape error; and nothing is "lost" in a run of one process
    assert not lost_contact(two, RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not lost_contact(two, KeyError("restore"))
    assert not lost_contact(one, RuntimeError(GLOO_RESET))


def test_lost_contact_error_is_one_line_naming_rank_step_and_checkpoint():
    err = lost_contact_error(DistInfo(rank=1, world_size=2), "after step 7", RuntimeError(GLOO_RESET),
                             Path("out/checkpoints/step-000006"), 20)  # fmt: skip
    assert isinstance(err, RunError) and "\n" not in str(err)
    assert str(err) == (
        "rank 1 of 2: lost contact with another process after step 7 (Read error [127.0.0.1]:5832: "
        "Connection reset by peer); the run stopped (train.dist_timeout=20s bounds each wait); "
        "resume with --resume from out/checkpoints/step-000006"
    )
    assert first_line(ValueError("")) == "ValueError"


def test_a_process_that_never_joins_fails_after_the_timeout(tmp_path, monkeypatch):
    """Rank 0 of 2 started alone (env:// rendezvous, as under a scheduler without torchrun)."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    start = time.monotonic()
    joined = r"rank 0 of 2: the 2 processes did not all join at 127\.0\.0\.1:\d+ within "
    joined += r"train\.dist_timeout=2s"
    with pytest.raises(RunError, match=joined + r" \(.*\); check that every process was started"):
        train(tiny_config(tmp_path / "out", train={"dist_timeout": 2}))
    assert time.monotonic() - start < 30
    assert not td.is_initialized()


def test_fsdp_in_one_process_without_torchrun(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    _, metrics = train(tiny_config(tmp_path / "out", train={"max_steps": 2, "distributed": "fsdp"}))
    assert metrics["steps"] == 2 and "comm_bytes_per_step" not in metrics
    assert not td.is_initialized()


# -- two processes, one killed or stopped mid-run ---------------------------------------------------


def _steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, victim, sig",
    [("fsdp", 1, signal.SIGKILL), ("ddp", 0, signal.SIGSTOP)],
    ids=["fsdp-kill-rank1", "ddp-stop-rank0"],
)
def test_survivor_stops_with_a_clear_line(tmp_path, mode, victim, sig):
    """Two processes NOT under one torchrun agent (env:// rendezvous). kill -9: the survivor's next
    collective fails at once (connection closed). SIGSTOP (a hung peer, the TCP connection still
    open): the survivor waits train.dist_timeout, no longer. Either way: one line, non-zero exit."""
    timeout = 20
    out = tmp_path / "out"
    cfg = tiny_config(out, train={"max_steps": 100000, "batch_size": 2, "save_every": 2, "log_every": 1,
                                  "distributed": mode, "dist_timeout": timeout})  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "loraforge", "train", str(config)],
            env={
                **subprocess_env(),
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for r in range(2)
    ]
    survivor = procs[1 - victim]
    try:
        deadline = time.monotonic() + 300  # start-up on a busy 2-core machine
        while _steps_logged(out) < 3 or not list((out / "checkpoints").glob("step-*")):
            assert time.monotonic() < deadline and survivor.poll() is None, "the run did not get going"
            time.sleep(0.2)
        os.kill(procs[victim].pid, sig)
        stopped = time.monotonic()
        _, err = survivor.communicate(timeout=5 * timeout)  # would raise TimeoutExpired on a hang
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert survivor.returncode != 0
    line = err.strip().splitlines()[-1]
    r = 1 - victim
    assert line.startswith(f"error: rank {r} of 2: lost contact with another process after step "), err
    assert "resume with --resume from " in line and "/checkpoints/step-" in line
    newest = line.rsplit("resume with --resume from ", 1)[1]
    assert json.loads((Path(tmp_path) / newest / "state.json").read_text())["step"] >= 2
    if sig == signal.SIGSTOP:  # nothing closed the connection: the timeout did it
        assert timeout * 0.8 < waited < 3 * timeout, waited  # (~1.2x on an idle 2-core machine)
        assert "timed out" in line.lower()
    else:
        assert waited < timeout, waited
