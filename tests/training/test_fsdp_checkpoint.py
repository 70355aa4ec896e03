"""FSDP checkpoints (training/sharded_checkpoint.py): atomic, exact resume, either format either way,
the optimizer state as it is, and the saved adapter usable (PEFT, merge).

Runs here use FSDP in one process (a group of one, no torchrun); test_fsdp_resume.py has the
torchrun runs (kill -9 of a rank then --resume; another world size)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as td
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

import loraforge as lf
from loraforge.training import checkpoint as ckpt
from loraforge.training import fsdp, train
from loraforge.training import sharded_checkpoint as sharded
from loraforge.training.lock import RunError

from .util import losses, tiny_config

STEPS = 6


def qlora_config(output: Path, **train_kw) -> dict:
    """QLoRA with dropout (the RNG state matters), a checkpoint every 2 steps, all kept."""
    t = {"max_steps": STEPS, "save_every": 2, "keep_checkpoints": 3, **train_kw}
    return tiny_config(output, method="qlora", lora={"dropout": 0.1}, train=t)


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict, tol: float = 0.0) -> None:
    assert a and set(a) == set(b)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two uninterrupted runs of the same config: under FSDP (one process) and plain."""
    root = tmp_path_factory.mktemp("fsdpckpt")
    train(qlora_config(root / "fsdp", distributed="fsdp"))
    train(qlora_config(root / "plain"))
    return root


def resume_from(checkpoint: Path, output: Path, **train_kw) -> Path:
    """A new run on ``output`` holding only a copy of ``checkpoint``, resumed from it."""
    shutil.copytree(checkpoint, output / "checkpoints" / checkpoint.name)
    train({**qlora_config(output, **train_kw), "resume": "auto"})
    return output


def test_fsdp_run_equals_plain_run_and_checkpoint_adapter(runs):
    assert losses(runs / "fsdp") == losses(runs / "plain")
    assert_same(adapter(runs / "fsdp"), adapter(runs / "plain"))  # bit for bit
    last = runs / "fsdp" / "checkpoints" / f"step-{STEPS:06d}"
    assert sharded.is_sharded_checkpoint(last)
    assert_same(load_file(str(last / "adapter" / "adapter_model.safetensors")), adapter(runs / "fsdp"))
    assert any(v.abs().max() > 0 for k, v in adapter(runs / "fsdp").items() if "lora_B" in k)  # trained


@pytest.mark.parametrize(
    "source, distributed",
    [("fsdp", "fsdp"), ("plain", "fsdp"), ("fsdp", "ddp")],
    ids=["fsdp-to-fsdp", "single-to-fsdp", "fsdp-to-single"],
)
def test_resume_is_bit_exact_in_either_format(runs, tmp_path, source, distributed):
    checkpoint = runs / source / "checkpoints" / "step-000002"
    out = resume_from(checkpoint, tmp_path / "out", distributed=distributed)
    assert losses(out) == losses(runs / source)[2:]  # dropout on: the RNG state came back too
    assert_same(adapter(out), adapter(runs / source))


def test_saved_adapter_loads_in_peft_and_merges(runs):
    """The FSDP-trained QLoRA adapter: PEFT loads it (same forward as loraforge's loader on the
    same base), and merge_and_unload on the 4-bit base keeps the forward."""
    peft = pytest.importorskip("peft")
    from loraforge.training.builtin import build_model
    from loraforge.training.config import ModelSection
    from loraforge.training.modeling import load_base_model

    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 11]])
    directory = runs / "fsdp" / "adapter"
    with torch.no_grad():
        base = build_model("builtin:tiny-llama").eval()
        plain_logits = base(ids).logits
        ours = build_model("builtin:tiny-llama").eval()
        lf.load_adapter(ours, directory)
        theirs = peft.PeftModel.from_pretrained(base, directory).eval()
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(theirs(ids).logits, plain_logits, atol=1e-4)  # not an empty adapter

        q = load_base_model(ModelSection(path="builtin:tiny-llama"), torch.device("cpu"), quantize=True)
        q.eval()
        lf.load_adapter(q, directory)
        unmerged = q(ids).logits
        merged = lf.merge_and_unload(q, dequantize=True)
        torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_model_equals_plain_run(tmp_path):
    from transformers import AutoModelForCausalLM

    def weights(output: Path) -> dict:
        return AutoModelForCausalLM.from_pretrained(output / "model").state_dict()

    t = {"max_steps": 3, "lr": 1e-3, "distributed": "fsdp", "save_every": 1, "keep_checkpoints": 3}
    cfg = tiny_config(tmp_path / "fsdp", method="full", train=t)
    train(cfg)
    train({**cfg, "output": str(tmp_path / "plain"), "train": {**cfg["train"], "distributed": "ddp"}})
    assert_same(weights(tmp_path / "fsdp"), weights(tmp_path / "plain"), tol=1e-5)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    step1 = tmp_path / "fsdp" / "checkpoints" / "step-000001"  # every weight and its Adam moments
    shutil.copytree(step1, tmp_path / "resumed" / "checkpoints" / step1.name)
    train({**cfg, "output": str(tmp_path / "resumed"), "resume": "auto"})
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")[1:]
    assert_same(weights(tmp_path / "resumed"), weights(tmp_path / "fsdp"))


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_a_skipped_first_step_changes_nothing_by_saving(tmp_path, monkeypatch):
    """Step 1's loss is NaN (skipped: no optimizer step yet, no Adam state). Saving a checkpoint
    then must not give Adam a step count: the run with a checkpoint every step equals the one
    without, and resuming from the step-1 checkpoint continues it exactly."""
    import math

    from loraforge.training import loop

    class Poisoned(loop.CausalLMLoss):
        calls = 0

        def forward(self, **batch):
            loss_sum, n = super().forward(**batch)
            Poisoned.calls += 1
            return (loss_sum * math.nan if Poisoned.calls == 1 else loss_sum), n

    def run(name, save_every, poisoned=True, **kw):
        monkeypatch.setattr(loop, "CausalLMLoss", Poisoned if poisoned else loop.CausalLMLoss)
        Poisoned.calls = 0
        t = {"max_steps": 4, "save_every": save_every, "keep_checkpoints": 5, "max_nonfinite_steps": 2}
        cfg = tiny_config(tmp_path / name, train={**t, "distributed": "fsdp"}, **kw)
        train(cfg)
        monkeypatch.undo()
        return losses(tmp_path / name)

    straight, saving = run("straight", 0), run("saving", 1)
    assert math.isnan(saving[0]) and saving[1:] == straight[1:]
    assert_same(adapter(tmp_path / "saving"), adapter(tmp_path / "straight"))
    step1 = tmp_path / "saving" / "checkpoints" / "step-000001"
    shutil.copytree(step1, tmp_path / "resumed" / "checkpoints" / step1.name)
    assert run("resumed", 1, poisoned=False, resume="auto") == straight[1:]
    assert_same(adapter(tmp_path / "resumed"), adapter(tmp_path / "straight"))


def test_another_world_size_with_the_same_global_batch_is_no_batch_change(tmp_path, monkeypatch):
    """2 processes x 2 rows saved, 1 process x 4 rows resumes: the same global batch, not refused."""
    from loraforge.training import ConfigError, TrainConfig
    from loraforge.training.resume import resume_changes

    saved = TrainConfig.from_dict(tiny_config(tmp_path, train={"batch_size": 2}))
    (tmp_path / "state.json").write_text(json.dumps({"global_batch": 4, "config": saved.to_dict()}))
    now = TrainConfig.from_dict(tiny_config(tmp_path, train={"batch_size": 4}))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resume_changes(now, tmp_path, print) == {}
    monkeypatch.setenv("WORLD_SIZE", "2")  # 2 x 4 = 8 rows per step: another run
    with pytest.raises(ConfigError, match=r"train.batch_size \(2 -> 4\)"):
        resume_changes(now, tmp_path, print)


# -- library level: an FSDP group of one and a small model -------------------------------------------


@pytest.fixture
def group():
    from loraforge.training.dist import setup

    info = setup("cpu", "fsdp")
    yield info
    if td.is_initialized():
        td.destroy_process_group()


def small(group, fresh: bool = False):
    """(model, AdamW, scheduler): three FSDP-sharded linears, the first frozen (a base); ``fresh``:
    other trainable weights (as a restarted run before loading a checkpoint)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    if fresh:
        with torch.no_grad():
            for layer in model[1:]:
                layer.weight.add_(1.0)
    fully_shard(model, mesh=group.mesh)
    opt = lf.build_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, LambdaLR(opt, lambda s: 1 / (1 + s))


def step(model, opt, sched, seed: int, skip_last: bool = False) -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    if skip_last:  # a parameter without a gradient: Adam gives it no state
        model[2].weight.grad = model[2].bias.grad = None
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def save(group, out, n, model, opt, sched, save_adapter=None, keep=2):
    return sharded.save(out, n, model, opt, sched, {"world_size": 1}, group, save_adapter, keep)


def trainable(model) -> dict:
    return {n: p.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_state_that_does_not_exist_is_not_invented(group, tmp_path):
    """A step skipped (non-finite loss) before the first optimizer step leaves no Adam state: a
    checkpoint then must not create any (it would count a step Adam never took)."""
    model, opt, sched = small(group)
    sched.step()  # the skipped step: the schedule moves, the optimizer does not
    path = save(group, tmp_path, 1, model, opt, sched)
    assert not opt.state
    assert not any(k.startswith("optim.") for k in saved_keys(path))
    step(model, opt, sched, 1, skip_last=True)  # now Adam state for all but the last layer
    path = save(group, tmp_path, 2, model, opt, sched)
    model2, opt2, sched2 = small(group, fresh=True)
    sharded.load(path, model2, opt2, sched2, group)
    assert len(opt2.state) == len(opt.state) == 2
    for p, q in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        assert (p in opt.state) == (q in opt2.state)
        for key in opt.state.get(p, {}):
            a, b = opt.state[p][key], opt2.state[q][key]
            assert torch.equal(fsdp.full_tensor(a), fsdp.full_tensor(b))
    for s in (2, 3):
        step(model, opt, sched, s)
        step(model2, opt2, sched2, s)
    assert_same(trainable(model), trainable(model2))


class Killed(BaseException):
    """Stands for a kill -9 at that point: not an Exception, so no clean-up of ours runs."""


def die(*args, **kwargs):
    raise Killed


REAL_RMTREE = shutil.rmtree


def rmtree_halfway(path, *args, **kwargs):
    """Deleting a pruned checkpoint: its shards go, then a kill (before its state.json goes)."""
    if Path(path).name.startswith(".tmp-"):
        return REAL_RMTREE(path, *args, **kwargs)
    for f in sorted(Path(path).rglob("*.safetensors")):
        f.unlink()
    raise Killed


def saved_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in (path / "sharded").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


@pytest.mark.parametrize(
    "where",
    [
        "checkpoint.save_state",  # while the processes write their parts
        "_fsync_tree",  # before the vote
        "checkpoint.rename_into_place",  # after state.json, before the rename
        "checkpoint.list_checkpoints",  # after the rename, before pruning
        "rmtree_while_pruning",  # deleting the oldest checkpoint
    ],
)
def test_a_kill_at_any_point_leaves_complete_checkpoints(group, tmp_path, monkeypatch, where):
    model, opt, sched = small(group)
    for n in (1, 2):
        step(model, opt, sched, n)
        save(group, tmp_path, n, model, opt, sched)
    before = trainable(model)
    step(model, opt, sched, 3)
    if where == "rmtree_while_pruning":
        monkeypatch.setattr(shutil, "rmtree", rmtree_halfway)
    elif where == "checkpoint.save_state":
        monkeypatch.setattr(ckpt, "save_state", die)
    else:
        target = ckpt if where.startswith("checkpoint.") else sharded
        monkeypatch.setattr(target, where.split(".")[-1], die)
    with pytest.raises(Killed):
        save(group, tmp_path, 3, model, opt, sched)
    monkeypatch.undo()
    ckpt.clean_partial(tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not any(n.startswith(".") for n in names)
    for path in ckpt.list_checkpoints(tmp_path):  # every one that is listed loads
        model2, opt2, sched2 = small(group, fresh=True)
        state = sharded.load(path, model2, opt2, sched2, group)
        if state["step"] == 2:
            assert_same(trainable(model2), before)
    assert "step-000002" in names  # the previous one is intact whatever happened


def test_a_failed_save_removes_its_tmp_and_keeps_the_earlier_ones(group, tmp_path):
    model, opt, sched = small(group)
    step(model, opt, sched, 1)
    save(group, tmp_path, 1, model, opt, sched)

    def full_disk(directory):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save(group, tmp_path, 2, model, opt, sched, save_adapter=full_disk)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    with torch.no_grad():
        model[1].weight.to_local()[0, 0] = float("nan")
    with pytest.raises(RunError, match=r"1\.weight holds NaN/Inf; not saved"):
        save(group, tmp_path, 2, model, opt, sched)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]


def test_the_same_step_saved_again_is_swapped(group, tmp_path):
    model, opt, sched = small(group)
    step(model, opt, sched, 1)
    save(group, tmp_path, 1, model, opt, sched)
    step(model, opt, sched, 2)
    path = save(group, tmp_path, 1, model, opt, sched)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-000001"]
    model2, opt2, sched2 = small(group, fresh=True)
    sharded.load(path, model2, opt2, sched2, group)
    assert_same(trainable(model2), trainable(model))


def test_files_are_safetensors_and_json(runs):
    path = runs / "fsdp" / "checkpoints" / "step-000004"
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes == {".json", ".safetensors"}
    assert json.loads((path / "state.json").read_text())["world_size"] == 1


def test_a_failing_shard_write_is_one_clear_error(group, tmp_path, monkeypatch):
    """DCP's own failure (a BaseException carrying every process's traceback) becomes a RunError;
    the .tmp goes, the earlier checkpoint stays."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model, opt, sched = small(group)
    step(model, opt, sched, 1)
    save(group, tmp_path, 1, model, opt, sched)

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", full_disk)
    with pytest.raises(RunError, match=r"step 2: writing the sharded checkpoint failed: process 0: OSError"):
        save(group, tmp_path, 2, model, opt, sched)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
