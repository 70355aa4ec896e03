"""The serving engine against the peers: each request's greedy tokens in a crowd of mixed
adapters equal the ones it gets alone, and equal transformers + PEFT ``generate``.

Models are tiny Llamas / GPT-2s with random weights built here; adapters have random nonzero B
(so they change the output), different ranks and different target modules.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import loraforge as lf
from loraforge.serving import engine as engine_mod
from loraforge.serving.engine import Engine, EngineError, SamplingParams

ADAPTERS = {  # name: (rank, target modules)
    "small": (2, ["q_proj", "v_proj"]),
    "mid": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "big": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
PROMPTS = [[3 + (7 * i + 5 * j) % 120 for j in range(n)] for i, n in enumerate([3, 5, 8, 9, 17, 30])]


class _Tok:
    """Enough of a tokenizer for token-id prompts: ids as text."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)

    def convert_ids_to_tokens(self, i):
        return f"<{i}>"

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def _randomize_b(model, name, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(config, base state dict, {adapter: directory})."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    cfg.eos_token_id = None
    state = {k: v.clone() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        m = _fresh(cfg, state)
        lf.inject(m, lf.LoraConfig(r=r, alpha=2 * r, target_modules=targets), adapter=name)
        _randomize_b(m, name, seed)
        paths[name] = lf.save_adapter(m, root / name, adapter=name)
    return cfg, state, paths


def _fresh(cfg, state, cls=LlamaForCausalLM):
    m = cls(copy.deepcopy(cfg))
    m.load_state_dict(state)
    m.generation_config.eos_token_id = None
    return m.eval()


def _engine(llama, **kw):
    cfg, state, paths = llama
    eng = Engine(_fresh(cfg, state), _Tok(), base_id="tiny", **kw)
    for name, path in paths.items():
        eng.register_adapter(name, path)
    return eng.start()


async def _run(eng, prompt, adapter, **params):
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 12)
    tokens = []
    async for out in eng.generate(prompt, adapter, SamplingParams(**params)):
        tokens += out.token_ids
    return tokens


def _jobs():
    return [(i, a) for i in range(len(PROMPTS)) for a in [None, *ADAPTERS]]


def test_crowd_equals_alone_equals_peft(llama):
    from peft import PeftModel

    eng = _engine(llama)

    async def main():
        alone = {job: await _run(eng, PROMPTS[job[0]], job[1]) for job in _jobs()}
        crowd = await asyncio.gather(*(_run(eng, PROMPTS[i], a) for i, a in _jobs()))
        await eng.shutdown()
        return alone, dict(zip(_jobs(), crowd))

    alone, crowd = asyncio.run(main())
    assert crowd == alone  # token for token, whoever else is in the step
    assert len({tuple(alone[(0, a)]) for a in [None, *ADAPTERS]}) == 4  # the adapters matter

    cfg, state, paths = llama
    for adapter in [None, *ADAPTERS]:
        model = _fresh(cfg, state)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(paths[adapter])).eval()
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
            )
            assert out[0, len(prompt) :].tolist() == alone[(i, adapter)], (adapter, i)


def test_lru_with_one_slot_and_unregister(llama):
    eng = _engine(llama, max_loras=1)
    assert len(eng.resident) == 1 and set(eng.adapters) == set(ADAPTERS)

    async def main():
        alone = {job: await _run(eng, PROMPTS[job[0]], job[1]) for job in _jobs()[:8]}
        crowd = await asyncio.gather(*(_run(eng, PROMPTS[i], a) for i, a in _jobs()[:8]))
        assert dict(zip(_jobs()[:8], crowd)) == alone  # requests waited for the one slot
        assert len(eng.resident) <= 1
        running = asyncio.ensure_future(_run(eng, PROMPTS[5], "big", max_tokens=40))
        await asyncio.sleep(0.05)
        eng.unregister_adapter("big")  # the running request finishes first
        assert len(await running) == 40
        with pytest.raises(KeyError):
            await _run(eng, PROMPTS[0], "big")
        assert "big" not in eng.resident
        await eng.shutdown()

    asyncio.run(main())


def test_cancelled_request_frees_its_slot(llama):
    eng = _engine(llama)

    async def main():
        gen = eng.generate(PROMPTS[2], "mid", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        await gen.__anext__()
        await gen.__anext__()
        await gen.aclose()  # what a server does when the client goes away
        for _ in range(200):
            if eng.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.num_running == 0
        assert await _run(eng, PROMPTS[1], "small") == await _run(eng, PROMPTS[1], "small")
        await eng.shutdown()

    asyncio.run(main())


def test_a_failing_request_fails_alone(llama, monkeypatch):
    eng = _engine(llama)
    real = engine_mod.choose

    def choose(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("boom")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "choose", choose)

    async def main():
        alone = await _run(eng, PROMPTS[4], "mid")
        results = await asyncio.gather(
            _run(eng, PROMPTS[4], "mid"), _run(eng, PROMPTS[3], "big", seed=666), return_exceptions=True
        )
        await eng.shutdown()
        return alone, results

    alone, (ok, failed) = asyncio.run(main())
    assert ok == alone
    assert isinstance(failed, EngineError) and "boom" in str(failed)


def test_prompt_logprobs_and_token_logprobs(llama):
    cfg, state, paths = llama
    eng = _engine(llama)
    prompt = PROMPTS[4]

    async def main():
        outs = [
            o
            async for o in eng.generate(
                prompt, "big", SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1)
            )
        ]
        echo = [o async for o in eng.generate(prompt, "big", SamplingParams(max_tokens=0, prompt_logprobs=0))]
        await eng.shutdown()
        return outs, echo

    outs, echo = asyncio.run(main())
    ref = _fresh(cfg, state)
    lf.load_adapter(ref, paths["big"], adapter="big")
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    plp = outs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for i in range(1, len(prompt)):
        assert plp[i].token_id == prompt[i]
        assert abs(plp[i].logprob - float(lp[i - 1, prompt[i]])) < 1e-4
        assert plp[i].top[0][0] == int(lp[i - 1].argmax())
    first = outs[0].logprobs[0]  # greedy: the chosen token is the most likely one
    assert first.token_id == int(lp[-1].argmax()) and abs(first.logprob - float(lp[-1].max())) < 1e-4
    assert [t[0] for t in first.top] == lp[-1].topk(2).indices.tolist()
    assert len(echo) == 1 and echo[0].finish_reason == "length" and echo[0].token_ids == []
    values = lambda lps: [p.logprob if p else None for p in lps]
    assert values(echo[0].prompt_logprobs) == values(plp)


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(llama):
    eng = _engine(llama)
    kw = dict(temperature=0.9, top_p=0.9, max_tokens=16)

    async def main():
        alone = await _run(eng, PROMPTS[3], "small", seed=7, **kw)
        crowd = await asyncio.gather(
            *(_run(eng, PROMPTS[3], "small", seed=7, **kw) for _ in range(3)),
            *(_run(eng, PROMPTS[i], a) for i, a in _jobs()[:6]),
        )
        other = await _run(eng, PROMPTS[3], "small", seed=8, **kw)
        await eng.shutdown()
        return alone, crowd[:3], other

    alone, crowd, other = asyncio.run(main())
    assert all(c == alone for c in crowd)
    assert other != alone


def test_limits_and_shutdown(llama):
    eng = _engine(llama, max_input_tokens=20, max_total_tokens=40)

    async def main():
        with pytest.raises(EngineError, match="at most 20"):
            await _run(eng, list(range(1, 30)), None)
        with pytest.raises(EngineError, match="exceeds"):
            await _run(eng, PROMPTS[4], None, max_tokens=30)
        with pytest.raises(EngineError, match="token ids"):
            await _run(eng, [1, 2, 500], None)
        with pytest.raises(KeyError):
            await _run(eng, PROMPTS[0], "nobody")
        pending = [asyncio.ensure_future(_run(eng, PROMPTS[i], "mid", max_tokens=15)) for i in range(4)]
        await asyncio.sleep(0)
        await eng.shutdown(drain=True)  # finishes what was submitted
        assert [len(await p) for p in pending] == [15] * 4
        with pytest.raises(EngineError, match="shutting down"):
            await _run(eng, PROMPTS[0], None)

    asyncio.run(main())


def test_stop_token_ids_and_eos(llama):
    eng = _engine(llama)

    async def main():
        full = await _run(eng, PROMPTS[5], "mid", max_tokens=12)
        cut = await _run(eng, PROMPTS[5], "mid", max_tokens=12, stop_token_ids=[full[3]])
        await eng.shutdown()
        return full, cut

    full, cut = asyncio.run(main())
    assert cut == full[: full.index(full[3]) + 1]


def test_four_bit_base(llama, tmp_path):
    cfg, state, paths = llama
    base = _fresh(cfg, state)
    base.save_pretrained(tmp_path / "base")
    q = {"quant_type": "nf4", "blocksize": 32, "compute_dtype": "float32"}

    def load():
        m = lf.load_model(tmp_path / "base", quantization=q).eval()
        m.generation_config.eos_token_id = None
        return m

    eng = Engine(load(), _Tok())
    eng.register_adapter("big", paths["big"])
    eng.start()

    async def main():
        alone = [await _run(eng, p, "big") for p in PROMPTS]
        crowd = await asyncio.gather(*(_run(eng, p, "big") for p in PROMPTS))
        await eng.shutdown()
        return alone, crowd

    alone, crowd = asyncio.run(main())
    assert crowd == alone
    ref = load()
    lf.load_adapter(ref, paths["big"], adapter="big")
    for prompt, got in zip(PROMPTS, alone):
        ids = torch.tensor([prompt])
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        out = ref.generate(**kw)
        assert out[0, len(prompt) :].tolist() == got


def test_gpt2_conv1d(tmp_path):
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    cfg.eos_token_id = None
    state = {k: v.clone() for k, v in GPT2LMHeadModel(cfg).state_dict().items()}
    m = _fresh(cfg, state, GPT2LMHeadModel)
    lf.inject(m, lf.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]), adapter="g")
    _randomize_b(m, "g", 3)
    path = lf.save_adapter(m, tmp_path / "g", adapter="g")
    eng = Engine(_fresh(cfg, state, GPT2LMHeadModel), _Tok())
    eng.register_adapter("g", path)
    eng.start()

    async def main():
        alone = [await _run(eng, p, a) for p in PROMPTS for a in (None, "g")]
        crowd = await asyncio.gather(*(_run(eng, p, a) for p in PROMPTS for a in (None, "g")))
        await eng.shutdown()
        return alone, crowd

    alone, crowd = asyncio.run(main())
    assert crowd == alone
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert m.generate(**kw)[0, len(prompt) :].tolist() == alone[2 * i + 1]


def test_register_refuses_what_does_not_fit(llama, tmp_path):
    cfg, state, paths = llama
    other = LlamaConfig(**{**cfg.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    m = LlamaForCausalLM(other)
    lf.inject(m, lf.LoraConfig(r=2, target_modules=["q_proj"]), adapter="x")
    wrong = lf.save_adapter(m, tmp_path / "wrong", adapter="x")
    eng = Engine(_fresh(cfg, state), _Tok())
    with pytest.raises(engine_mod.AdapterError, match="wrong"):
        eng.register_adapter("wrong", wrong)
    with pytest.raises(engine_mod.AdapterError, match="adapter_config"):
        eng.register_adapter("none", tmp_path)
    eng.register_adapter("small", paths["small"])
    with pytest.raises(engine_mod.AdapterError, match="taken"):
        eng.register_adapter("small", paths["small"])
    # other methods' adapters load in the library but the engine's per-token adapters are LoRA's
    for name, method_cfg in (
        ("ia3", lf.IA3Config()),
        ("prefix", lf.PrefixTuningConfig(num_virtual_tokens=2)),
    ):
        m = lf.inject(_fresh(cfg, state), method_cfg, adapter=name)
        saved = lf.save_adapter(m, tmp_path / name, adapter=name)
        with pytest.raises(
            engine_mod.AdapterError, match=f"a {method_cfg.peft_type} adapter; loraforge serve serves LoRA"
        ):
            eng.register_adapter(name, saved)
    assert list(eng.adapters) == ["small"]


def test_kv_cache_grows_with_what_is_generated(llama):
    """A request that may ask for many tokens holds memory for what it has generated so far."""
    eng = _engine(llama)

    async def main():
        gen = eng.generate(PROMPTS[1], "big", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        await gen.__anext__()
        small = eng._running[0].cache.nbytes()
        tokens = 1 + sum([len(o.token_ids) async for o in gen])
        await eng.shutdown()
        return small, tokens

    small, tokens = asyncio.run(main())
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv_heads x head_dim x fp32
    assert small <= (len(PROMPTS[1]) + 128) * per_token  # not the 205 tokens it may reach
    assert tokens == 200  # and it grew past its first allocation


def test_chat_uses_the_template_saved_with_the_adapter(tmp_path):
    """An adapter directory's chat_template.jinja (training saves the tokenizer there) decides
    its chat prompts; an adapter without one uses the base tokenizer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.demo.app import SHIPPED_BASE

    tok = AutoTokenizer.from_pretrained(SHIPPED_BASE)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_BASE)
    lf.inject(model, lf.LoraConfig(r=2, target_modules=["q_proj"]), adapter="x")
    own = lf.save_adapter(model, tmp_path / "own", adapter="x")
    plain = lf.save_adapter(model, tmp_path / "plain", adapter="x")
    (own / "chat_template.jinja").write_text("ASK {{ messages[-1]['content'] }} ANSWER", encoding="utf-8")
    eng = Engine(AutoModelForCausalLM.from_pretrained(SHIPPED_BASE), tok)
    eng.register_adapter("own", own)
    eng.register_adapter("plain", plain)
    messages = [{"role": "user", "content": "What colour is snow?"}]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    base_ids = ids(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert eng.encode_chat(messages, "own") == ids("ASK What colour is snow? ANSWER")
    assert eng.encode_chat(messages, "plain") == base_ids == eng.encode_chat(messages, None)
