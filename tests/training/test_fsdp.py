"""train.distributed=fsdp: FSDP2 training equals a single process, for lora, qlora and full; the
4-bit base keeps its bytes and format when sharded (also under mixed precision)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as td
from safetensors.torch import load_file

from loraforge.training import ConfigError, TrainConfig, train

from .util import QA_EVAL, losses, subprocess_env, tiny_config

STEPS = {"max_steps": 3, "eval_every": 3}


def evals(output: Path) -> list[float]:
    rows = map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def result(output: Path) -> dict[str, torch.Tensor]:
    sub = "model/model.safetensors" if (output / "model").is_dir() else "adapter/adapter_model.safetensors"
    return load_file(str(output / sub))


def assert_same_run(a: Path, b: Path, tol: float) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) > 0
    assert max(abs(x - y) for x, y in zip(la, lb)) <= tol, (la, lb)
    assert max(abs(x - y) for x, y in zip(evals(a), evals(b))) <= tol
    ra, rb = result(a), result(b)
    assert ra.keys() == rb.keys() and ra
    for key in ra:
        assert (ra[key].float() - rb[key].float()).abs().max().item() <= tol, key


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_one_process_fsdp_equals_plain(tmp_path, method):
    """FSDP in one process (a group of one, no torchrun) trains exactly as the plain loop."""
    cfg = tiny_config(tmp_path / "plain", method=method, data={"eval": QA_EVAL}, train=STEPS)
    train(cfg)
    cfg = tiny_config(tmp_path / "fsdp", method=method, data={"eval": QA_EVAL}, train=STEPS)
    cfg["train"]["distributed"] = "fsdp"
    _, metrics = train(cfg)
    assert not td.is_initialized()  # the group of one is gone with the run
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp", 1e-6)
    assert metrics["world_size"] == 1


def test_gradient_accumulation_under_fsdp(tmp_path):
    """2 micro-batches of 2 (the gradient reduce-scatter only after the last) = 1 batch of 4."""
    train(tiny_config(tmp_path / "one", method="qlora", data={"eval": QA_EVAL}, train=STEPS))
    cfg = tiny_config(tmp_path / "acc", method="qlora", data={"eval": QA_EVAL}, train=STEPS)
    cfg["train"].update(distributed="fsdp", batch_size=2, grad_accum=2)
    train(cfg)
    assert_same_run(tmp_path / "one", tmp_path / "acc", 1e-5)


def test_mixed_precision_keeps_the_4bit_bytes(tmp_path):
    """Under bf16 mixed precision the packed uint8 weights are neither cast nor changed, and the
    quantization constants stay float32; the LoRA factors train (in bf16 compute)."""
    from loraforge.quant import Linear4bit
    from loraforge.training.fsdp import local_tensor
    from loraforge.training.modeling import load_base_model

    cfg = tiny_config(tmp_path / "bf16", method="qlora", train=STEPS)
    cfg["train"].update(distributed="fsdp", fsdp={"mixed_precision": "bfloat16"})
    model, metrics = train(cfg)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "bf16"))))
    reference = load_base_model(TrainConfig.from_dict(cfg).model, torch.device("cpu"), quantize=True)
    ref4 = {n: m for n, m in reference.named_modules() if isinstance(m, Linear4bit)}
    trained = {
        n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, Linear4bit)
    }
    assert set(trained) == set(ref4) and ref4
    for name, module in trained.items():
        packed = local_tensor(module.weight)
        assert packed.dtype == torch.uint8 and torch.equal(packed, ref4[name].weight), name
        assert module.quant_state.absmax.dtype == ref4[name].quant_state.absmax.dtype
        assert torch.equal(module.quant_state.absmax, ref4[name].quant_state.absmax)


def test_fsdp_refuses_prompt_methods(tmp_path):
    cfg = tiny_config(tmp_path, method="prefix")
    cfg["train"]["distributed"] = "fsdp"
    with pytest.raises(ConfigError, match="train.distributed: fsdp shards lora, qlora, dora and full"):
        TrainConfig.from_dict(cfg)


def torchrun(tmp_path: Path, config: Path, n: int, output: Path, *overrides: str):
    return subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "loraforge", "train", str(config), f"output={output}", "train.distributed=fsdp",
            f"train.batch_size={4 // n}", *overrides,
        ],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("n, method", [(2, "lora"), (2, "qlora"), (4, "lora"), (4, "qlora")])
def test_processes_match_one(tmp_path, n, method):
    """2 and 4 processes, each holding 1/n of the model, train the same steps as 1 process (the
    same global batch of 4 rows): losses and the adapter within 1e-5."""
    cfg = tiny_config(tmp_path / "one", method=method, data={"eval": QA_EVAL}, train=STEPS)
    train(cfg)
    config = tmp_path / "run.yaml"
    config.write_text(TrainConfig.from_dict(cfg).to_yaml())
    run = torchrun(tmp_path, config, n, tmp_path / "many")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "many", 1e-5)
    # each process holds about 1/n of the parameters (plus the replicated 4-bit constants and the
    # padding of small tensors to a multiple of n)
    end = [r for r in map(json.loads, (tmp_path / "many" / "metrics.jsonl").read_text().splitlines())
           if r.get("event") == "end"][-1]  # fmt: skip
    held = end["param_bytes_per_process"] / end["param_bytes_total"]
    assert 1 / n <= held < 1 / n + 0.15, end
