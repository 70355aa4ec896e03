"""planning/memory.py's ``planned_model_cache``: within one ``lf.plan`` each distinct meta model is
built once (the advice's re-estimates mostly change ``train``/``data`` only), and nothing the plan
says changes. (No time bound here: on a busy 2-core machine it would not be robust; the speed-up
was measured by hand: the 70B plan's own time from ~10 s to ~2 s.)"""

from __future__ import annotations

import contextlib

import pytest

from loraforge.planning import advice, load_config, memory, plan

GiB = 2**30
RATE = {"gemm_flops": 1e10}
QLORA_FSDP = ({"method": "qlora", "model": {"path": "smollm2-135m"}, "data": {"max_length": 512},
               "train": {"batch_size": 2, "max_steps": 1, "distributed": "fsdp"}},
              {"device": "cuda", "world_size": 2, "memory": int(0.9 * GiB)})  # fmt: skip
LORA_CPU = ({"method": "lora", "model": {"path": "smollm2-135m"}, "data": {"max_length": 2048},
             "train": {"batch_size": 4, "max_steps": 1}}, {"memory": int(2 * GiB)})  # fmt: skip


@pytest.fixture
def builds(monkeypatch):
    """How many planned models are built (counted where they are made)."""
    count = []
    build = memory._build_planned_model
    monkeypatch.setattr(memory, "_build_planned_model", lambda *a: count.append(1) or build(*a))
    return count


@pytest.mark.parametrize("case", [QLORA_FSDP, LORA_CPU], ids=["qlora-fsdp-cuda", "lora-cpu"])
def test_the_plan_is_the_same_with_and_without_the_cache(case, builds, monkeypatch):
    config, kw = case
    cached = plan(config, **kw, **RATE)
    n_cached = len(builds)
    assert cached.suggestions and not cached.fits
    monkeypatch.setattr(memory, "planned_model_cache", contextlib.nullcontext)
    uncached = plan(config, **kw, **RATE)
    assert uncached.to_dict() == cached.to_dict()
    assert uncached.render() == cached.render()
    # the uncached plan built a model per estimate; the cached one one per distinct model
    assert n_cached < len(builds) - n_cached
    assert n_cached == (2 if cached.config.method == "lora" else 1)  # (the advice's QLoRA tries a 4-bit one)


def test_the_cache_lives_for_one_plan_and_keys_on_what_builds_the_model(builds):
    plan(*QLORA_FSDP[:1], **QLORA_FSDP[1], **RATE)
    assert memory._PLANNED is None  # (not kept past the plan: a 70B meta model per shape otherwise)
    with memory.planned_model_cache():
        cfg = load_config(LORA_CPU[0])
        mc = plan(LORA_CPU[0], **RATE).model_config
        before = len(builds)
        same = ([], ["train.batch_size=1"], ["data.max_length=128", "train.optimizer=adamw_8bit"])
        est = [memory.estimate_memory(load_config(LORA_CPU[0], over), model_config=mc) for over in same]
        assert len(builds) == before  # train/data changes: the same model
        other = (["lora.r=4"], ["lora.target_modules=[q_proj]"], ["model.dtype=bfloat16"], ["method=qlora"])
        for over in other:
            memory.estimate_memory(load_config(LORA_CPU[0], over), model_config=mc)
        assert len(builds) == before + 4  # each of these builds its own
    assert est[0].peak_bytes > est[1].peak_bytes > 0
    r4 = load_config(LORA_CPU[0], ["lora.r=4"])
    assert memory.planned_key(cfg, mc, "x") != memory.planned_key(r4, mc, "x")
    full = load_config({**LORA_CPU[0], "method": "full"})  # (no adapter section: still a key)
    assert memory.planned_key(full, mc, "x") != memory.planned_key(cfg, mc, "x")


def test_advice_outside_a_plan_is_uncached_and_agrees():
    p = plan(*QLORA_FSDP[:1], **QLORA_FSDP[1], **RATE)
    again = advice.suggest(p)  # (outside lf.plan: every estimate built afresh)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in p.suggestions]
