"""Checkpoint files: exact state round trip, safetensors + JSON only, atomic and pruned."""

from __future__ import annotations

import json

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import loraforge as lf
from loraforge.training import checkpoint as ckpt


def setup(opt_name="adamw", seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)  # a frozen part, as under LoRA
    opt = lf.build_optimizer(opt_name, model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = LambdaLR(opt, lambda s: 1 / (1 + s))
    return model, opt, sched


def run(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        loss = torch.nn.functional.dropout(model(x), 0.2).pow(2).mean()  # uses the global RNG
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("opt_name", ["adamw", "adamw_8bit"])
def test_resume_continues_exactly(tmp_path, opt_name):
    if opt_name != "adamw":
        pytest.importorskip("bitsandbytes")
    model, opt, sched = setup(opt_name)
    first = run(model, opt, sched, 3, seed=1)
    ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"note": "x"})
    straight = run(model, opt, sched, 3, seed=2)

    model2, opt2, sched2 = setup(opt_name)  # same frozen base, as when a run restarts
    with torch.no_grad():
        for p in model2.parameters():
            if p.requires_grad:
                p.add_(1.0)  # trainable weights differ until loaded
    torch.manual_seed(999)  # and so does the RNG state
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-000003", model2, opt2, sched2)
    assert state["step"] == 3 and state["note"] == "x"
    resumed = run(model2, opt2, sched2, 3, seed=2)
    assert first and resumed == straight  # bit for bit
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt, sched = setup()
    run(model, opt, sched, 1, seed=0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {}, save_adapter=None)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "optimizer.json",
        "optimizer.safetensors",
        "rng.json",
        "rng.safetensors",
        "scheduler.json",
        "state.json",
        "trainable.safetensors",
    ]
    json.loads((path / "optimizer.json").read_text())


def test_flatten_roundtrip_of_nested_state():
    state = {"a": (1, 2.5, None), 3: [torch.arange(3), {"x": torch.ones(2, dtype=torch.bfloat16)}], "s": "t"}
    tensors = {}
    meta = json.loads(json.dumps(ckpt.flatten_state(state, tensors)))
    back = ckpt.unflatten_state(meta, tensors)
    assert back["a"] == (1, 2.5, None) and back["s"] == "t"
    assert torch.equal(back[3][0], torch.arange(3)) and back[3][1]["x"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.flatten_state({"f": object()}, {})


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    model, opt, sched = setup()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000006"]
    # a save killed before its rename, and a directory without state.json: never resumed from
    (root / ".tmp-step-000008-123").mkdir()
    (root / ".tmp-step-000008-123" / "state.json").write_text("{}")
    (root / "step-000010").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000006"
    ckpt.clean_partial(tmp_path)
    assert not (root / ".tmp-step-000008-123").exists()


def test_mismatched_model_is_refused(tmp_path):
    model, opt, sched = setup()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {})
    other = torch.nn.Linear(8, 4)
    opt2 = lf.build_optimizer("adamw", other.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="does not match this model's trainable parameters"):
        ckpt.load_checkpoint(path, other, opt2, LambdaLR(opt2, lambda s: 1.0))
