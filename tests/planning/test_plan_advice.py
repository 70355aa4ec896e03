"""planning/advice.py: with a memory budget, the changes that make a run fit, each re-estimated on
the changed config, cheapest first; FSDP's smallest N; a stack when no single change fits."""

from __future__ import annotations

import pytest

from loraforge.planning import plan
from loraforge.planning.advice import MAX_DEVICES

GiB = 2**30
RATE = {"gemm_flops": 1e10}  # (no CPU measurement in these tests)


def lora(**train):
    return {
        "method": "lora",
        "model": {"path": "smollm2-135m"},
        "data": {"max_length": 2048},
        "train": {"batch_size": 4, "max_steps": 1, **train},
    }


def full():
    return {"method": "full", "model": {"path": "smollm2-135m"}, "data": {"max_length": 64},
            "train": {"batch_size": 1, "max_steps": 1}}  # fmt: skip


def replan(p, s):
    """The suggestion's config planned from scratch: its overrides and world size."""
    return plan(p.config.to_dict(), overrides=s.overrides, world_size=s.world_size, **RATE)


def test_each_suggestion_fits_and_is_its_configs_own_estimate():
    p = plan(lora(), memory=int(2 * GiB), **RATE)
    assert p.fits is False and p.memory.peak_bytes > 2 * GiB
    assert len(p.suggestions) >= 2
    names = [s.change for s in p.suggestions]
    assert "activation checkpointing" in names and any(n.startswith("max_length") for n in names)
    assert [s.rank for s in p.suggestions] == sorted(s.rank for s in p.suggestions)  # cheapest first
    for s in p.suggestions:
        assert s.fits and s.peak_bytes <= 2 * GiB
        again = replan(p, s)
        assert again.memory.peak_bytes == s.peak_bytes
        assert again.seconds_per_step == pytest.approx(s.seconds_per_step)
    ckpt = next(s for s in p.suggestions if s.change == "activation checkpointing")
    assert ckpt.seconds_per_step > p.seconds_per_step  # the recompute costs FLOPs, and says so
    assert ckpt.cost.startswith(f"+{ckpt.seconds_per_step / p.seconds_per_step - 1:.0%}")
    text = p.render()
    assert "does NOT fit in 2.00 GiB" in text and "apply: train.gradient_checkpointing=true" in text


def test_a_smaller_micro_batch_keeps_the_effective_batch():
    p = plan(lora(batch_size=8, grad_accum=2), memory=int(4.5 * GiB), **RATE)
    micro = next(s for s in p.suggestions if s.change.startswith("micro-batch"))
    cfg = replan(p, micro).config
    assert cfg.train.batch_size * cfg.train.grad_accum == 16 and cfg.train.batch_size < 8
    # the largest micro-batch that fits: the next one up does not
    bigger = plan(lora(batch_size=8, grad_accum=2), overrides=[f"train.batch_size={cfg.train.batch_size * 2}",
                  f"train.grad_accum={16 // (cfg.train.batch_size * 2)}"], **RATE)  # fmt: skip
    assert bigger.memory.peak_bytes > 4.5 * GiB


def test_fsdp_suggests_the_smallest_number_of_devices_that_fits():
    budget = int(1.45 * GiB)
    p = plan(full(), memory=budget, **RATE)
    fsdp = next(s for s in p.suggestions if s.change.startswith("FSDP"))
    n = fsdp.world_size
    assert 2 <= n < MAX_DEVICES and fsdp.fits and "train.distributed=fsdp" in fsdp.overrides
    fewer = plan(full(), overrides=["train.distributed=fsdp"], world_size=n - 1, **RATE)
    assert fewer.memory.peak_bytes > budget
    assert f"--world-size {n}" in p.render()


def test_fsdp_over_the_devices_a_ddp_run_already_has_is_cheaper_than_more_devices():
    p = plan(full(), memory=int(1.45 * GiB), world_size=4, **RATE)
    fsdp = next(s for s in p.suggestions if s.change.startswith("FSDP"))
    assert fsdp.world_size == 4 and "the 4 devices the run has" in fsdp.cost and fsdp.rank == 4


def test_when_no_single_change_fits_the_cheapest_stack_does():
    # below what the shortest max_length (the change that saves most here) reaches alone
    shortest = plan(lora(), overrides=["data.max_length=64"], **RATE).memory.peak_bytes
    p = plan(lora(), memory=shortest - 64 * 2**20, **RATE)
    assert len(p.suggestions) == 1
    stack = p.suggestions[0]
    assert stack.fits and " + " in stack.change
    assert "8-bit optimizer" not in stack.change  # pruned: the fit does not need it (LoRA's state is tiny)
    assert replan(p, stack).memory.peak_bytes == stack.peak_bytes
    assert "no single change fits; the cheapest combination" in p.render()


def test_a_run_that_fits_gets_no_suggestions():
    p = plan(lora(), memory="64GiB", **RATE)
    assert p.fits is True and p.suggestions == []
    assert "fits in 64.00 GiB per device" in p.render()


def test_the_70b_qlora_plan_takes_seconds_on_meta():
    """No weight is read: the 70B config builds on the meta device."""
    p = plan({"method": "qlora", "model": {"path": "llama-3-70b", "dtype": "bfloat16"},
              "data": {"max_length": 2048}, "train": {"batch_size": 1, "max_steps": 1}},
             device="cuda", memory="80GiB", **RATE)  # fmt: skip
    packed = p.memory.bytes_of("4-bit packed weights")
    assert packed == pytest.approx(68_451_041_280 / 2, rel=1e-6)  # the 4-bit linears' weights, 2 per byte
    assert p.params["total"] == 70_553_706_496
    assert p.fits in (True, False)


def test_an_fsdp_run_that_does_not_fit_is_offered_more_devices_than_it_has():
    budget = int(1.45 * GiB)
    p = plan(full(), overrides=["train.distributed=fsdp"], world_size=2, memory=budget, **RATE)
    assert not p.fits
    fsdp = next(s for s in p.suggestions if s.change.startswith("FSDP"))
    assert fsdp.world_size > 2 and fsdp.rank == 7 and f"needs {fsdp.world_size} devices" in fsdp.cost
