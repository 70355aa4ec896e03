"""Prefix tuning, prompt tuning and P-tuning pinned against peft 0.21 on tiny random models:
forward, loss, gradients, generation, files both ways, and the clear refusals."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2
from safetensors.torch import load_file, save_file

import loraforge as lf
from loraforge.methods.prompt_layers import PromptLearningLayer

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}

# (our config kwargs, PEFT's config class and kwargs); each built fresh: PEFT fills its config in place
METHODS = {
    "prefix": (lf.PrefixTuningConfig, {}, "PrefixTuningConfig", {}),
    "prefix_projection": (
        lf.PrefixTuningConfig,
        {"prefix_projection": True, "encoder_hidden_size": 8},
        "PrefixTuningConfig",
        {"prefix_projection": True, "encoder_hidden_size": 8},
    ),
    "prompt": (lf.PromptTuningConfig, {}, "PromptTuningConfig", {}),
    "p_tuning_mlp": (
        lf.PromptEncoderConfig,
        {"encoder_hidden_size": 8},
        "PromptEncoderConfig",
        {"encoder_hidden_size": 8},
    ),
    "p_tuning_lstm": (
        lf.PromptEncoderConfig,
        {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8},
        "PromptEncoderConfig",
        {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8},
    ),
}
N = 3  # virtual tokens


@pytest.fixture(autouse=True)
def _quiet(one_thread):
    with warnings.catch_warnings():
        # (PEFT passes the cache under its deprecated name; it drops position_ids for prompt tuning)
        warnings.simplefilter("ignore")
        yield


def configs(method: str, n: int = N):
    ours, kw, theirs, peft_kw = METHODS[method]
    return ours(num_virtual_tokens=n, **kw), getattr(peft, theirs)(
        task_type="CAUSAL_LM", num_virtual_tokens=n, **peft_kw
    )


def pair(arch: str, method: str, n: int = N, seed: int = 3):
    """(ours, PEFT's) on the same base weights and the same random prompt weights."""
    ours_cfg, peft_cfg = configs(method, n)
    theirs = peft.get_peft_model(BUILDERS[arch](), peft_cfg).eval()
    ours = lf.inject(BUILDERS[arch](), ours_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ours.prompt_encoder["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return ours, theirs


def batch(seed: int = 1, pad: bool = True):
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :2] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_loss_and_gradients_match_peft(arch, method):
    ours, theirs = pair(arch, method)
    ids, mask = batch()
    if arch == "llama":  # (no dropout in the tiny Llama: train mode is deterministic)
        ours.train(), theirs.train()
    a = ours(input_ids=ids, attention_mask=mask, labels=ids)
    b = theirs(input_ids=ids, attention_mask=mask, labels=ids)
    virtual = 0 if method.startswith("prefix") else N
    assert a.logits.shape == b.logits.shape == (2, 6 + virtual, 96)  # PEFT's shapes: virtual positions too
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    a.loss.backward()
    b.loss.backward()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {
        n: p.grad for n, p in theirs.named_parameters() if p.requires_grad and n.startswith("prompt_encoder.")
    }
    assert trainable == set(theirs_grads)  # prompt_encoder.default.<...> on both sides, biases included
    assert lf.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    for n, p in ours.named_parameters():
        if n in trainable:
            torch.testing.assert_close(p.grad, theirs_grads[n], atol=1e-5, rtol=1e-4)
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_grouped_query_attention_model_matches_peft(method):
    ours, theirs = pair("qwen2", method)
    ids, mask = batch()
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask), theirs(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    assert lf.methods.prompt.live_tensors(ours, "default")["prompt_embeddings"].shape[1] == (
        2 * 2 * 16 if method == "prefix" else 32  # prefix: 2·layers·(head_dim·kv_heads)
    )


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_position_ids_move_on_by_the_virtual_tokens(method):
    ours, theirs = pair("llama", method)
    ids, mask = batch(pad=False)
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        # PEFT adds num_virtual_tokens for prefix tuning, drops them for prompt tuning (same positions)
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def greedy(model, ids, mask, steps: int, positions: bool, virtual: int = 0):
    """Greedy decoding by full forwards (no cache): the reference for generate."""
    for _ in range(steps):
        kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if positions else {}
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask, **kw).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, -steps:]


def generate(model, ids, mask, steps: int):
    model.generation_config.eos_token_id = None  # (random weights: run all steps)
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("method", ["prefix", "prefix_projection", "prompt", "p_tuning_mlp"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_a_greedy_loop_over_peft_forward(arch, method):
    # (PEFT 0.21.2's own generate, under transformers 5.2x, loses the prefix / repeats the virtual
    # tokens at each step: it looks for the cache under its old name; its forward is the reference)
    ours, theirs = pair(arch, method)
    ids, mask = batch(pad=False)
    steps = 6
    out = generate(ours, ids, mask, steps)
    assert torch.equal(out, greedy(theirs, ids, mask, steps, positions=False))
    # left padding: generate passes position ids from the mask; PEFT's forward with them (prefix
    # tuning shifts them as loraforge does) or loraforge's own forward (prompt tuning: PEFT drops them)
    ids, mask = batch(pad=True)
    reference = theirs if method.startswith("prefix") else ours
    assert torch.equal(generate(ours, ids, mask, steps), greedy(reference, ids, mask, steps, positions=True))


def test_virtual_tokens_count_against_the_context_window():
    ours, _ = pair("gpt2", "prefix", n=8)  # n_positions 64
    ids = torch.randint(3, 96, (1, 57))
    with pytest.raises(
        ValueError,
        match=r"8 virtual tokens and 57 tokens of input need 65 positions.*\(64\)",
    ):
        ours(input_ids=ids)
    ours(input_ids=ids[:, :56])  # 64 positions: fits
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(ours, ids[:, :50], torch.ones(1, 50, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"num_virtual_tokens=64 leaves no room.*max_position_embeddings=64"):
        lf.inject(tiny_llama(), lf.PromptTuningConfig(num_virtual_tokens=64))


@pytest.mark.parametrize("method", list(METHODS))
def test_our_file_loads_in_peft_with_same_logits(tmp_path, method):
    ours, theirs = pair("llama", method)
    lf.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    reference.pop("peft_version")
    assert mine == reference  # adapter_config.json as PEFT writes it
    a, b = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "peft" / WEIGHTS)
    assert list(a) == ["prompt_embeddings"] and a["prompt_embeddings"].shape == b["prompt_embeddings"].shape
    torch.testing.assert_close(a["prompt_embeddings"], b["prompt_embeddings"], atol=1e-6, rtol=0)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    ids, mask = batch()
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)


WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_file_loads_in_loraforge_with_same_logits(tmp_path, arch, method):
    ours, theirs = pair(arch, method)
    theirs.save_pretrained(tmp_path)
    model = lf.load_adapter(BUILDERS[arch](), tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
    # as PEFT's loaded adapter: the table only (the encoder is gone), which trains on
    encoder = model.prompt_encoder["default"]
    assert [n for n, _ in encoder.named_parameters()] == ["embedding.weight"]
    assert encoder.embedding.weight.requires_grad
    # and a save of it is the same file
    lf.save_adapter(model, tmp_path / "again")
    torch.testing.assert_close(load_file(tmp_path / "again" / WEIGHTS), load_file(tmp_path / WEIGHTS))


def test_reparameterised_adapter_saved_and_loaded_back_gives_its_outputs(tmp_path):
    ours, _ = pair("gpt2", "prefix_projection")
    lf.save_adapter(ours, tmp_path)
    back = lf.load_adapter(tiny_gpt2(), tmp_path)
    ids, mask = batch()
    with torch.no_grad():
        a, b = (
            ours(input_ids=ids, attention_mask=mask).logits,
            back(input_ids=ids, attention_mask=mask).logits,
        )
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_text_init_matches_peft(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate("<unk> the cat sat on a mat classify this".split())}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    text = "classify this cat"  # 3 tokens, repeated to 7
    theirs = peft.get_peft_model(
        tiny_llama(),
        peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=7,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(tmp_path),
        ),
    )
    ours = lf.inject(
        tiny_llama(), lf.PromptTuningConfig(7, init="text", init_text=text, tokenizer=str(tmp_path))
    )
    want = theirs.prompt_encoder["default"].embedding.weight
    got = ours.prompt_encoder["default"].embedding.weight
    assert got.dtype == torch.float32 and torch.equal(got, want)
    embed = tiny_llama().get_input_embeddings().weight
    assert torch.equal(got[3], embed[words["classify"]]) and torch.equal(got[6], embed[words["classify"]])
    with pytest.raises(ValueError, match="tokenizer '/no/such/dir' could not be loaded"):
        lf.inject(
            tiny_llama(), lf.PromptTuningConfig(7, init="text", init_text=text, tokenizer="/no/such/dir")
        )


def test_switch_disable_delete_unload():
    ours, _ = pair("llama", "prompt")
    base = tiny_llama()
    ids, mask = batch()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
        with lf.disable_adapters(ours):
            torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, plain)
        lf.inject(ours, lf.PrefixTuningConfig(num_virtual_tokens=2), adapter="other")
        first = ours(input_ids=ids, attention_mask=mask).logits
        lf.set_adapter(ours, "other")
        assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
            "prompt_encoder.other.embedding.weight"
        ]
        assert ours(input_ids=ids, attention_mask=mask).logits.shape == (2, 6, 96)
        copied = copy.deepcopy(ours)
        lf.delete_adapter(ours, "other")  # "default" becomes active again
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, first)
        lf.unload(ours)
        assert not hasattr(ours, "prompt_encoder") and not ours._forward_pre_hooks
        assert not ours.base_model._forward_pre_hooks
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits, plain)
        # the copy kept its own adapters and hooks
        assert copied(input_ids=ids, attention_mask=mask).logits.shape == (2, 6, 96)


def test_merge_is_refused_and_changes_nothing():
    ours, _ = pair("llama", "prefix")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge \['default'\]: prompt learning adapters cannot"):
        lf.merge(ours)
    with pytest.raises(ValueError, match="cannot merge"):
        lf.merge_and_unload(ours)
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(ours.prompt_encoder, PromptLearningLayer)


def test_mixed_batch_of_prompt_adapters():
    ours, _ = pair("llama", "prompt")
    lf.inject(ours, lf.PromptTuningConfig(num_virtual_tokens=N), adapter="b")
    lf.inject(ours, lf.PromptTuningConfig(num_virtual_tokens=5), adapter="long")
    lf.inject(ours, lf.PrefixTuningConfig(num_virtual_tokens=N), adapter="prefix")
    ids, mask = batch()
    with torch.no_grad():
        with lf.adapter_batch(ours, ["b", "default"]):
            mixed = ours(input_ids=ids, attention_mask=mask).logits
        lf.set_adapter(ours, "b")
        torch.testing.assert_close(mixed[0], ours(input_ids=ids, attention_mask=mask).logits[0])
        lf.set_adapter(ours, "default")
        torch.testing.assert_close(mixed[1], ours(input_ids=ids, attention_mask=mask).logits[1])
        with lf.adapter_batch(ours, ["long", "default"]):
            with pytest.raises(ValueError, match="got long: prompt of 5, default: prompt of 3"):
                ours(input_ids=ids, attention_mask=mask)
        with lf.adapter_batch(ours, ["prefix", "default"]):
            with pytest.raises(ValueError, match="of one kind"):
                ours(input_ids=ids, attention_mask=mask)
        with lf.adapter_batch(ours, ["__base__", "default"]):
            with pytest.raises(ValueError, match=r"rows \['__base__'\] have no prompt adapter"):
                ours(input_ids=ids, attention_mask=mask)
        lf.set_adapter(ours, ["default", "b"])
        with pytest.raises(ValueError, match=r"prompt adapters \['default', 'b'\] are active at once"):
            ours(input_ids=ids, attention_mask=mask)


def test_a_cache_belongs_to_its_adapter():
    ours, _ = pair("llama", "prefix")
    lf.inject(ours, lf.PrefixTuningConfig(num_virtual_tokens=N), adapter="b")
    ids, _ = batch()
    with torch.no_grad():
        cache = ours(input_ids=ids, use_cache=True).cache
        lf.set_adapter(ours, "b")
        with pytest.raises(ValueError, match="virtual tokens of prompt adapter 'default', not of 'b'"):
            ours(input_ids=ids[:, :1], cache=cache)
        base_cache = tiny_llama()(input_ids=ids, use_cache=True).cache
        with pytest.raises(ValueError, match="holds 6 tokens computed without prompt adapter 'b'"):
            ours(input_ids=ids[:, :1], cache=base_cache)


@pytest.mark.parametrize("build", [tiny_bert, "t5"])
def test_models_that_are_not_decoder_only_causal_lms_are_refused(build):
    if build == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        model = T5ForConditionalGeneration(
            T5Config(vocab_size=96, d_model=16, d_ff=32, num_layers=1, num_heads=2)
        )
        match = "encoder-decoder"
    else:
        model, match = build(), "not a decoder-only causal LM"
    with pytest.raises(ValueError, match=match):
        lf.inject(model, lf.PromptTuningConfig(num_virtual_tokens=2))
    assert not hasattr(model, "prompt_encoder")


def test_the_callers_config_is_not_changed_and_fits_any_model():
    cfg = lf.PrefixTuningConfig(num_virtual_tokens=2)
    a, b = lf.inject(tiny_llama(), cfg), lf.inject(tiny_gpt2(), cfg)
    assert cfg.token_dim is None
    assert lf.methods.prompt.live_tensors(a, "default")["prompt_embeddings"].shape == (2, 2 * 2 * 16)
    assert lf.methods.prompt.live_tensors(b, "default")["prompt_embeddings"].shape == (2, 2 * 2 * 32)


def test_bad_files_are_refused_with_the_model_untouched(tmp_path):
    ours, _ = pair("llama", "prompt")
    lf.save_adapter(ours, tmp_path)
    save_file({"prompt_embeddings": torch.zeros(3, 31)}, str(tmp_path / WEIGHTS))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"shape mismatch for 'prompt_embeddings': file has \(3, 31\)"):
        lf.load_adapter(model, tmp_path)
    assert not hasattr(model, "prompt_encoder") and all(p.requires_grad for p in model.parameters())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value, match in [
        ("num_virtual_tokens", "3", "num_virtual_tokens must be a positive integer"),
        ("task_type", "SEQ_2_SEQ_LM", "CAUSAL_LM"),
        ("token_dim", 64, "token_dim is 64 but the model has 32"),
        ("prompt_tuning_init", "WORDS", "prompt_tuning_init must be one of"),
        ("new_feature", {"on": True}, "unknown config key"),
    ]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=match):
            lf.load_adapter(model, tmp_path)
        assert not hasattr(model, "prompt_encoder")


def test_config_from_dict_takes_peft_names_and_names_the_closest_key():
    cfg = lf.PromptTuningConfig.from_dict(
        {"num_virtual_tokens": 4, "prompt_tuning_init": "RANDOM", "tokenizer_name_or_path": None}
    )
    assert cfg.init == "random"
    with pytest.raises(ValueError, match="unknown PrefixTuningConfig key 'num_virtual_token' .did you mean"):
        lf.PrefixTuningConfig.from_dict({"num_virtual_token": 4})
    with pytest.raises(ValueError, match="PromptEncoderConfig.encoder_reparameterization_type must be"):
        lf.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        lf.PrefixTuningConfig()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_from_inputs_embeds(method):
    ours, theirs = pair("llama", method)
    ids, mask = batch(pad=False)
    ours.generation_config.eos_token_id = None
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(ids)
        out = ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, greedy(theirs, ids, mask, 4, positions=False))
