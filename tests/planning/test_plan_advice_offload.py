"""planning/advice.py: FSDP's CPU offload (``train.fsdp.cpu_offload``) as a suggestion: on CUDA, for
a run under FSDP or moved to it over its own devices; re-estimated, with the host RAM it needs."""

from __future__ import annotations

from pathlib import Path

from loraforge.planning import fmt_bytes, plan

GiB = 2**30
RATE = {"gemm_flops": 1e10}  # (no CPU measurement in these tests)
ROOT = Path(__file__).resolve().parents[2]


def full(distributed="fsdp"):
    return {"method": "full", "model": {"path": "smollm2-135m"}, "data": {"max_length": 256},
            "train": {"batch_size": 1, "max_steps": 1, "distributed": distributed,
                      "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"}}  # fmt: skip


def between(config, **kw):
    """A budget the offloaded run fits and the run as it is does not."""
    on_gpu = plan(config, device="cuda", world_size=2, **RATE).memory.peak_bytes
    offloaded = plan(config, overrides=["train.distributed=fsdp", "train.fsdp.cpu_offload=true"],
                     device="cuda", world_size=2, **RATE).memory.peak_bytes  # fmt: skip
    assert offloaded < on_gpu
    return (on_gpu + offloaded) // 2


def offload_of(p):
    return next(s for s in p.suggestions if "CPU offload" in s.change)


def test_an_fsdp_run_is_offered_cpu_offload_before_more_devices():
    p = plan(full(), device="cuda", world_size=2, memory=between(full()), **RATE)
    assert p.fits is False
    s = offload_of(p)
    assert s.overrides == ["train.fsdp.cpu_offload=true"] and s.world_size == 2 and s.fits
    again = plan(full(), overrides=s.overrides, device="cuda", world_size=2, **RATE)
    assert again.memory.peak_bytes == s.peak_bytes  # re-estimated: the changed config's own figure
    host = again.memory.host_bytes
    assert host > 0 and f"needs {fmt_bytes(host)} of host RAM per process" in s.cost
    assert f"{fmt_bytes(2 * host)} for the 2 processes" in s.cost and s.cost.startswith("slower steps")
    more = next(x for x in p.suggestions if x.change.startswith("FSDP over"))
    assert more.world_size > 2 and p.suggestions.index(s) < p.suggestions.index(more)  # no new hardware first
    assert [x.rank for x in p.suggestions] == sorted(x.rank for x in p.suggestions)
    assert "apply: train.fsdp.cpu_offload=true  (--world-size 2" in p.render()


def test_a_ddp_run_is_moved_to_fsdp_over_its_devices_with_offload():
    p = plan(full("ddp"), device="cuda", world_size=2, memory=between(full("ddp")), **RATE)
    s = offload_of(p)
    assert s.change == "FSDP over the 2 devices with CPU offload" and s.world_size == 2
    assert s.overrides == ["train.distributed=fsdp", "train.fsdp.cpu_offload=true"]
    again = plan(full("ddp"), overrides=s.overrides, device="cuda", world_size=2, **RATE)
    assert again.memory.peak_bytes == s.peak_bytes and again.memory.host_bytes > 0


def test_no_offload_where_it_does_not_apply():
    budget = int(0.9 * GiB)
    # a CPU run (its shards are in host memory already), a single-process ddp run, an offloaded run
    for config, device, world, over in [(full(), "cpu", 2, []), (full("ddp"), "cuda", 1, []),
                                        (full(), "cuda", 2, ["train.fsdp.cpu_offload=true"])]:  # fmt: skip
        p = plan(config, overrides=over, device=device, world_size=world, memory=budget, **RATE)
        assert not p.fits
        assert all("cpu_offload" not in " ".join(s.overrides) for s in p.suggestions), (device, world, over)


def test_a_stack_with_offload_states_the_stacks_own_host_ram():
    """No single change fits: the stack holds the offload, and its host RAM is the stack's own."""
    train = {**full()["train"], "batch_size": 2, "gradient_checkpointing": False, "optimizer": "adamw"}
    config = {**full(), "data": {"max_length": 1024}, "train": train}
    p = plan(config, device="cuda", world_size=2, memory=int(1.3 * GiB), **RATE)
    [s] = p.suggestions
    assert s.change == "activation checkpointing + FSDP CPU offload" and s.fits and s.world_size == 2
    assert s.overrides == ["train.gradient_checkpointing=true", "train.fsdp.cpu_offload=true"]
    again = plan(config, overrides=s.overrides, device="cuda", world_size=2, **RATE)
    assert again.memory.peak_bytes == s.peak_bytes
    assert f"needs {fmt_bytes(again.memory.host_bytes)} of host RAM per process" in s.cost
    assert s.cost.startswith("+")  # (the checkpointing's own cost comes first)


def test_the_70b_qlora_on_two_24gb_gpus_fits_with_offload():
    """Answer.AI's FSDP+QLoRA answer: a 70B Llama trains on 2 x 24 GB with the shards offloaded."""
    p = plan(ROOT / "configs/plan_qlora_70b.yaml", device="cuda", memory="24GiB", world_size=2, **RATE)
    assert p.fits is False
    s = offload_of(p)
    assert s.fits and s.overrides == ["train.fsdp.cpu_offload=true"] and s.world_size == 2
    assert any(x.change == "FSDP over 3 devices" and x.fits for x in p.suggestions)
