"""The serving engine with DoRA adapters beside a LoRA one: each request's greedy tokens in a
crowd equal the ones it gets alone, and equal transformers + PEFT ``generate`` with the adapter."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loraforge as lf
from loraforge.serving.engine import Engine

from .test_engine import PROMPTS, _fresh, _run, _Tok

ADAPTERS = {  # name: (rank, target modules, DoRA)
    "dora_attn": (4, ["q_proj", "v_proj", "o_proj"], True),
    "dora_all": (8, "all-linear", True),
    "plain": (4, ["q_proj", "down_proj"], False),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    cfg.eos_token_id = None
    state = {k: v.clone() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, (name, (r, targets, use_dora)) in enumerate(ADAPTERS.items()):
        m = _fresh(cfg, state)
        lf.inject(m, lf.LoraConfig(r=r, alpha=2 * r, target_modules=targets, use_dora=use_dora), adapter=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if f"lora_magnitude_vector.{name}." in pname:
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
        paths[name] = lf.save_adapter(m, root / name, adapter=name)
    return cfg, state, paths


def test_dora_requests_in_a_crowd_equal_alone_equal_peft(llama):
    from peft import PeftModel

    cfg, state, paths = llama
    eng = Engine(_fresh(cfg, state), _Tok(), base_id="tiny")
    for name, path in paths.items():
        eng.register_adapter(name, path)
    eng.start()
    jobs = [(i, a) for i in range(4) for a in [None, *ADAPTERS]]

    async def main():
        alone = {job: await _run(eng, PROMPTS[job[0]], job[1]) for job in jobs}
        crowd = await asyncio.gather(*(_run(eng, PROMPTS[i], a) for i, a in jobs))
        await eng.shutdown()
        return alone, dict(zip(jobs, crowd))

    alone, crowd = asyncio.run(main())
    assert crowd == alone
    assert len({tuple(alone[(3, a)]) for a in [None, *ADAPTERS]}) == 4  # the adapters matter
    for adapter in ADAPTERS:
        model = PeftModel.from_pretrained(_fresh(cfg, state), str(paths[adapter])).eval()
        assert model.peft_config["default"].use_dora == ADAPTERS[adapter][2]
        for i in range(4):
            ids = torch.tensor([PROMPTS[i]])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
            )
            assert out[0, len(PROMPTS[i]) :].tolist() == alone[(i, adapter)], (adapter, i)
