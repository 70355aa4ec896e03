"""The engine on a real pretrained LLM (SmolLM2-135M-Instruct): chat answers of mixed adapters
served together equal `loraforge generate`'s for each adapter (its chat template, its EOS)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import loraforge as lf
from loraforge.serving.engine import Engine, SamplingParams
from loraforge.training.inference import generate

QUESTIONS = ["What colour is the sky?", "How many legs does a spider have?"]
NEW = 16


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-adapters")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    paths = {}
    for i, (name, r) in enumerate([("eight", 8), ("sixteen", 16)]):
        cfg = lf.LoraConfig(r=r, alpha=r, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
        lf.add_adapter(model, name, cfg) if i else lf.inject(model, cfg, adapter=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        paths[name] = lf.save_adapter(model, root / name, adapter=name)
    return model, AutoTokenizer.from_pretrained(smollm2_dir), paths, smollm2_dir


def test_mixed_chat_equals_loraforge_generate(served):
    model, tok, paths, base = served
    eng = Engine(AutoModelForCausalLM.from_pretrained(base), tok, base_id="SmolLM2-135M-Instruct")
    for name, path in paths.items():
        eng.register_adapter(name, path)
    eng.start()
    jobs = [(q, a) for q in QUESTIONS for a in (None, *paths)]

    async def ask(question, adapter):
        ids = eng.encode_chat([{"role": "user", "content": question}], adapter)
        text = ""
        async for out in eng.generate(ids, adapter, SamplingParams(max_tokens=NEW, temperature=0)):
            text += out.text
        return text

    async def main():
        answers = await asyncio.gather(*(ask(q, a) for q, a in jobs))
        await eng.shutdown()
        return answers

    served_answers = dict(zip(jobs, asyncio.run(main())))
    for (question, adapter), text in served_answers.items():
        if adapter is None:
            with lf.disable_adapters(model):
                want = generate(model, tok, question, max_new_tokens=NEW)
        else:
            lf.set_adapter(model, adapter)
            want = generate(model, tok, question, max_new_tokens=NEW)
        assert text == want, (question, adapter)
    assert len({served_answers[(QUESTIONS[0], a)] for a in (None, *paths)}) == 3  # adapters matter
