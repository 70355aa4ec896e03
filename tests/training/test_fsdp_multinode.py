"""Past one machine: communication per step measured (and equal to the analytic figure), and a
simulated 2-node FSDP run (two torchrun agents on loopback) equal to one process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid

import pytest
import torch
from torch import nn

from loraforge.training import TrainConfig, comm, train

from .util import losses, subprocess_env, tiny_config


def files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the meter and the formulas, in this process ----------------------------------------------------


def test_padded_bytes_follow_fsdp_layout():
    w = nn.Parameter(torch.zeros(5, 3))  # 5 rows over 2 processes: padded to 6
    assert comm.padded_bytes(w, 2) == 6 * 3 * 4
    assert comm.padded_bytes(w, 2, torch.bfloat16) == 6 * 3 * 2
    packed = nn.Parameter(torch.zeros(7, 1, dtype=torch.uint8), requires_grad=False)
    assert comm.padded_bytes(packed, 4, torch.bfloat16) == 8  # not floating: never cast


def test_meter_counts_collectives_of_a_group_of_one():
    import torch.distributed as td

    store = td.HashStore()
    td.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with comm.CommMeter() as meter:
            td.all_reduce(torch.zeros(10))
            out = torch.zeros(6)
            td.all_gather_single(out, torch.zeros(6))
            td.reduce_scatter_single(torch.zeros(3), torch.zeros(3))
            torch.zeros(4) + 1  # not a collective
    finally:
        td.destroy_process_group()
    assert meter.bytes == {"all_reduce": 40, "all_gather": 24, "reduce_scatter": 12}
    assert comm.per_process(meter.bytes, 2) == pytest.approx(40 + 12 + 6)
    line = comm.describe(meter.bytes, 1, 2)
    assert line.startswith("communication per optimizer step (measured at step 1): all-gather 24 B")


# -- 2 processes (env:// rendezvous): measured == analytic ----------------------------------------

WORKER = r"""
import json, os, sys
import torch
from loraforge.training import train, comm, fsdp
cfgs, port0, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
results = []
for i, cfg in enumerate(cfgs):
    os.environ["MASTER_PORT"] = str(port0 + i)
    model, metrics = train(cfg)
    t = cfg["train"]
    if t["distributed"] == "fsdp":
        expected = comm.fsdp_expected(
            fsdp.decoder_layers(model), model, 2, t["grad_accum"], t["fsdp"]["reshard_after_forward"]
        )
    else:
        expected = comm.ddp_expected(model)
    results.append({"measured": metrics["comm_bytes_per_step"], "expected": expected})
if os.environ["RANK"] == "0":
    with open(out, "w") as f:
        json.dump(results, f)
"""


@pytest.mark.slow
def test_measured_bytes_equal_the_analytic_figure(tmp_path):
    """DDP: one all-reduce of the LoRA gradients per step. FSDP: every unit gathered (twice per
    micro-batch with reshard_after_forward), its trainable gradients reduce-scattered once.

    Tolerance: the all-gathers and reduce-scatters must match to the byte (same padding rule as
    FSDP2). The all-reduce may exceed the gradients by a few scalars (at most 64 bytes): nothing in
    forward/backward sends any today, but a tensor such as a loss or a flag would be one."""
    runs = []
    for i, (mode, accum, reshard) in enumerate([("ddp", 2, True), ("fsdp", 2, True), ("fsdp", 1, False)]):
        t = {"max_steps": 2, "batch_size": 1, "grad_accum": accum, "distributed": mode}
        t["fsdp"] = {"reshard_after_forward": reshard}
        runs.append(tiny_config(tmp_path / f"run{i}", train=t))
    port, result = free_port(), tmp_path / "result.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(runs), str(port), str(result)],
            env={
                **subprocess_env(),
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    ddp, fsdp_reshard, fsdp_kept = json.loads(result.read_text())
    print(ddp, fsdp_reshard, fsdp_kept, sep="\n")

    assert set(ddp["measured"]) == {"all_reduce"}
    assert 0 <= ddp["measured"]["all_reduce"] - ddp["expected"]["all_reduce"] <= 64
    for run in (fsdp_reshard, fsdp_kept):
        assert set(run["measured"]) == {"all_gather", "reduce_scatter"}
        assert run["measured"] == run["expected"]
    # reshard_after_forward gathers each layer again for the backward
    assert fsdp_reshard["measured"]["all_gather"] > fsdp_kept["measured"]["all_gather"] * 2 * 1.5
    # the LoRA gradients' bytes travel either way (FSDP: padded shards of the same tensors)
    assert fsdp_kept["measured"]["reduce_scatter"] >= ddp["expected"]["all_reduce"]
    assert "communication per optimizer step (measured at step 1)" in outs[0][0]


# -- a simulated 2-node run: two torchrun agents on loopback -----------------------------------------


@pytest.mark.slow
def test_two_nodes_match_one_process(tmp_path):
    """``--nnodes 2 --nproc_per_node 1`` with c10d rendezvous (node ranks assigned by it) and one
    shared output: the losses of the 1-process FSDP run with the same global batch, the results
    written once, the bytes per step measured and printed."""
    steps = {"max_steps": 3, "save_every": 2, "distributed": "fsdp"}
    cfg = tiny_config(tmp_path, train=steps)
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    _, one = train({**cfg, "output": str(tmp_path / "one")})  # FSDP in one process, no torchrun
    assert "comm_bytes_per_step" not in one  # a group of one sends nothing

    port, rdzv_id = free_port(), uuid.uuid4().hex[:8]
    torchrun = "-m torch.distributed.run --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d "
    torchrun += f"--rdzv-endpoint 127.0.0.1:{port} --rdzv-id {rdzv_id}"
    # 2 nodes x micro-batch 2 = the global batch of 4 rows
    command = [sys.executable, *torchrun.split(), "-m", "loraforge", "train", str(config)]
    command += [f"output={tmp_path / 'two'}", "train.batch_size=2"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    agents = [subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), **pipes) for _ in range(2)]
    outs = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(err[-3000:] for _, err in outs)

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    # one process wrote the results: each metric once, one adapter; each rank its checkpoint shard
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    one_files, two_files = files(tmp_path / "one"), files(tmp_path / "two")
    assert one_files <= two_files  # and beyond them only rank 1's shards and random states
    assert {f for f in two_files - one_files if "00001" not in f.rsplit("/", 1)[-1]} == set()
    assert any("sharded/" in f for f in two_files - one_files)
    # the bytes per step, measured on the main process (whichever node it is) and in the metrics
    said = [line for out, _ in outs for line in out.splitlines() if "communication per optimizer" in line]
    assert len(said) == 1, said
    end = records[-1]
    assert end["event"] == "end" and end["world_size"] == 2
    sent = end["comm_bytes_per_step"]
    assert sent["all_gather"] > 0 and sent["reduce_scatter"] > 0
    print(said[0])
