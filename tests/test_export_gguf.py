"""GGUF export (loraforge.export_gguf): the gguf reader round trip, transformers reading the file back,
and llama.cpp itself (through llama-cpp-python, where it is installed)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_lora

import loraforge as lf

gguf = pytest.importorskip("gguf")

from loraforge.export_gguf import ExportError, export_gguf  # noqa: E402
from loraforge.export_gguf_vocab import LLAMA3_SPLIT, VocabError, pre_tokenizer_name  # noqa: E402
from loraforge.training.inference import load_with_adapters  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [5, 17, 200, 33, 400, 9, 71]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny models: one thread (tests/conftest.py)."""


def _save_adapter(model, path, seed=1, std=0.2, **cfg):
    lf.inject(model, lf.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": TARGETS, **cfg}))
    randomize_lora(model, std=std, seed=seed)
    lf.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """builtin:tiny-llama saved as a directory (weights + byte-level BPE tokenizer), and two adapters
    on it: plain LoRA, and rsLoRA with a rank pattern (scalings llama.cpp's alpha / r does not give)."""
    from loraforge.training.builtin import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    base = root / "base"
    build_model("builtin:tiny-llama").save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    plain = _save_adapter(load_with_adapters(str(base), {}, "float32", "cpu")[0], root / "lora")
    odd = _save_adapter(
        load_with_adapters(str(base), {}, "float32", "cpu")[0],
        root / "rslora",
        seed=2,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 3.0},
    )
    return {"base": str(base), "lora": str(plain), "rslora": str(odd), "root": root}


def _merged(base, adapter=None):
    model, _ = load_with_adapters(base, {"default": adapter} if adapter else {}, "float32", "cpu")
    return lf.merge_and_unload(model) if adapter else model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _rel(a, b) -> float:
    a, b = (
        torch.as_tensor(np.asarray(a), dtype=torch.float32),
        torch.as_tensor(np.asarray(b), dtype=torch.float32),
    )
    return float((a - b).abs().max() / b.abs().max())


def _llama_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order written out index by index (independent of permute_rows): in each
    head of d rows, row i of the first half goes to 2i, row i of the second half to 2i + 1."""
    d = w.shape[0] // n_head
    order = torch.empty(w.shape[0], dtype=torch.long)
    for h in range(n_head):
        for i in range(d // 2):
            order[h * d + 2 * i] = h * d + i
            order[h * d + 2 * i + 1] = h * d + d // 2 + i
    return w[order]


def _expected_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> values, in llama.cpp's layout, for a Llama model."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if ".q_proj." in name:
            t = _llama_rows(t, cfg.num_attention_heads)
        elif ".k_proj." in name:
            t = _llama_rows(t, cfg.num_key_value_heads)
        out[_name(name)] = t
    return out


def _name(hf: str) -> str:
    table = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in fixed or hf == "lm_head.weight":
        return fixed.get(hf, "output.weight")
    parts = hf.split(".")  # model.layers.<i>.<module...>.weight
    return f"blk.{parts[2]}.{table['.'.join(parts[3:-1])]}.{parts[-1]}"


def _field(reader, key):
    return reader.fields[key].contents()


def _values(t) -> np.ndarray:
    """A reader tensor's values, in torch layout (reversed GGUF shape), dequantized."""
    shape = tuple(int(x) for x in reversed(t.shape))
    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    return np.asarray(t.data, dtype=np.float32).reshape(shape)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_merged_round_trip(tiny, tmp_path, kind):
    """Every tensor's name, shape, type and values, and the metadata, as gguf's reader reads them."""
    out = export_gguf(tiny["base"], tmp_path / "m.gguf", adapter=tiny["lora"], type=kind)
    reader = gguf.GGUFReader(out)
    model = _merged(tiny["base"], tiny["lora"])
    cfg = model.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.type") == "model"
    assert _field(reader, "llama.context_length") == cfg.max_position_embeddings
    assert _field(reader, "llama.embedding_length") == cfg.hidden_size
    assert _field(reader, "llama.feed_forward_length") == cfg.intermediate_size
    assert _field(reader, "llama.block_count") == cfg.num_hidden_layers
    assert _field(reader, "llama.attention.head_count") == cfg.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert _field(reader, "llama.rope.dimension_count") == cfg.hidden_size // cfg.num_attention_heads
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[:4] == ["<s>", "</s>", "<pad>", "<unk>"]
    assert list(_field(reader, "tokenizer.ggml.token_type")[:5]) == [3, 3, 3, 3, 1]  # control, then normal
    merges = _field(reader, "tokenizer.ggml.merges")
    tok = json.loads((Path(tiny["base"]) / "tokenizer.json").read_text())
    assert len(merges) == len(tok["model"]["merges"]) > 0
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 0
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 1

    expected = _expected_tensors(model)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)  # (no rotary buffers, every weight)
    q = gguf.GGMLQuantizationType
    for name, want in expected.items():
        t = got[name]
        assert tuple(int(x) for x in t.shape) == tuple(reversed(want.shape)), name
        values, want = _values(t), want.numpy()
        if want.ndim == 1:
            assert t.tensor_type == q.F32 and np.array_equal(values, want), name
        elif kind == "f32":
            assert t.tensor_type == q.F32 and np.array_equal(values, want), name
        elif kind == "f16" or want.shape[-1] % 32:  # (Q8_0: rows of 176 are no whole blocks -> F16)
            assert t.tensor_type == q.F16, name
            assert np.array_equal(values, want.astype(np.float16).astype(np.float32)), name
        else:  # Q8_0: per block of 32, half a step d = max|x|/127, plus 127 q·(d - fp16(d)) <= 0.062 d
            assert t.tensor_type == q.Q8_0, name
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(values.reshape(-1, 32) - blocks) <= 0.57 * step + 1e-7).all(), name
            assert not np.array_equal(values, want), name
    assert _field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[kind]
    if kind == "q8_0":  # (attention and gate/up matrices: rows of 64)
        assert got["blk.0.attn_q.weight"].tensor_type == q.Q8_0


def test_q8_0_falls_back_to_f16_for_short_rows(tmp_path):
    """A matrix whose rows are not whole Q8_0 blocks (here 48 columns) is written F16, as
    llama.cpp's converter does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.training.builtin import build_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    reader = gguf.GGUFReader(export_gguf(str(tmp_path / "m"), tmp_path / "q.gguf", type="q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64


@pytest.mark.parametrize("kind,tol", [("f32", 1e-5), ("f16", 1e-2)])
def test_transformers_reads_merged_back(tiny, tmp_path, kind, tol):
    """Independent of llama.cpp: transformers' GGUF reader (which undoes the q/k permutation) gives
    the merged model's next-token logits."""
    from transformers import AutoModelForCausalLM

    export_gguf(tiny["base"], tmp_path / "m.gguf", adapter=tiny["rslora"], type=kind)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    want = _logits(_merged(tiny["base"], tiny["rslora"]))
    assert _rel(_logits(back.eval()), want) <= tol
    assert _rel(_logits(back.eval()), _logits(_merged(tiny["base"]))) > 10 * tol  # (the adapter counts)


def test_qwen2_round_trip(tmp_path):
    """Qwen2: biases on q/k/v, no permutation; transformers reads the same logits back."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from loraforge.training.builtin import build_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # (random biases: zeros would hide a permuted or dropped bias)
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "q")
    build_tokenizer().save_pretrained(tmp_path / "q")
    out = export_gguf(str(tmp_path / "q"), tmp_path / "q.gguf", type="f32")
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "qwen2"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= names
    bias = next(t for t in reader.tensors if t.name == "blk.1.attn_k.bias")
    assert np.array_equal(_values(bias), model.model.layers[1].self_attn.k_proj.bias.detach().numpy())
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32)
    assert _rel(_logits(back.eval()), _logits(model)) <= 1e-5


def _lora_tensors(reader) -> dict[str, np.ndarray]:
    return {t.name: _values(t) for t in reader.tensors}


@pytest.mark.parametrize("adapter", ["lora", "rslora"])
def test_lora_gguf(tiny, tmp_path, adapter):
    """llama.cpp's LoRA-adapter GGUF: its metadata, A / B under llama.cpp's names and shapes, and
    what llama.cpp computes from it, base + alpha / r · B A per layer (in llama.cpp's layout),
    equals the merged model's weights written by the merged export."""
    out = export_gguf(tiny["base"], tmp_path / "a.gguf", adapter=tiny[adapter], type="f32", lora_only=True)
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "adapter.type") == "lora"
    alpha = _field(reader, "adapter.lora.alpha")
    assert alpha == 8.0
    lora = _lora_tensors(reader)
    cfg = _merged(tiny["base"]).config
    assert len(lora) == 2 * len(TARGETS) * cfg.num_hidden_layers
    a, b = lora["blk.0.attn_q.weight.lora_a"], lora["blk.0.attn_q.weight.lora_b"]
    assert a.shape == (4, cfg.hidden_size) and b.shape == (cfg.hidden_size, 4)  # (GGUF: [in, r], [r, out])
    t = {t.name: t for t in reader.tensors}["blk.0.attn_q.weight.lora_a"]
    assert tuple(int(x) for x in t.shape) == (cfg.hidden_size, 4)
    # llama.cpp's sum, from the files alone
    base = _expected_tensors(_merged(tiny["base"]))
    merged = _expected_tensors(_merged(tiny["base"], tiny[adapter]))
    for name, want in merged.items():
        if f"{name}.lora_a" not in lora:
            assert torch.equal(base[name], want), name
            continue
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        got = base[name].numpy() + alpha / a.shape[0] * (b @ a)
        assert np.abs(got - want.numpy()).max() <= 1e-5 * max(1.0, np.abs(want.numpy()).max()), name


def test_lora_gguf_factors_are_the_adapters(tiny, tmp_path):
    """A plain adapter's factors are written as they are (B of q/k in llama.cpp's row order)."""
    from safetensors.torch import load_file

    out = export_gguf(tiny["base"], tmp_path / "a.gguf", adapter=tiny["lora"], type="f16", lora_only=True)
    lora = _lora_tensors(gguf.GGUFReader(out))
    files = load_file(os.path.join(tiny["lora"], "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.{}.lora_{}.weight"
    half = lambda t: t.half().float().numpy()  # noqa: E731
    assert np.array_equal(lora["blk.1.attn_k.weight.lora_a"], half(files[key.format("k_proj", "A")]))
    assert np.array_equal(
        lora["blk.1.attn_k.weight.lora_b"], half(_llama_rows(files[key.format("k_proj", "B")], 2))
    )
    assert np.array_equal(lora["blk.1.attn_v.weight.lora_b"], half(files[key.format("v_proj", "B")]))


def test_refusals(tiny, tmp_path):
    """One line each, nothing written."""
    from conftest import tiny_gpt2

    with pytest.raises(ExportError, match="--lora-only needs --adapter"):
        export_gguf(tiny["base"], tmp_path / "x.gguf", lora_only=True)
    (tmp_path / "there.gguf").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="not overwritten"):
        export_gguf(tiny["base"], tmp_path / "there.gguf")
    assert (tmp_path / "there.gguf").read_bytes() == b"keep"
    with pytest.raises(ExportError, match="--type 'q4'"):
        export_gguf(tiny["base"], tmp_path / "x.gguf", type="q4")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    shutil.copy(os.path.join(tiny["base"], "tokenizer.json"), tmp_path / "gpt2")
    with pytest.raises(ExportError, match="model type 'gpt2' cannot be exported"):
        export_gguf(str(tmp_path / "gpt2"), tmp_path / "x.gguf")
    q4 = tmp_path / "q4"
    shutil.copytree(tiny["base"], q4)
    raw = json.loads((q4 / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q4 / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError, match="base is saved quantized"):
        export_gguf(str(q4), tmp_path / "x.gguf")
    dora = _save_adapter(
        load_with_adapters(tiny["base"], {}, "float32", "cpu")[0], tmp_path / "dora", use_dora=True
    )
    with pytest.raises(ExportError, match="DoRA has no llama.cpp LoRA GGUF form"):
        export_gguf(tiny["base"], tmp_path / "x.gguf", adapter=str(dora), lora_only=True)
    export_gguf(tiny["base"], tmp_path / "x.gguf", adapter=str(dora), type="f32")  # merged: fine
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["there.gguf", "x.gguf"]  # (no temp files)
    assert not list(tmp_path.glob(".*tmp*"))


def test_pre_tokenizer_names():
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smol = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}  # fmt: skip
    assert pre_tokenizer_name({"pre_tokenizer": smol}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}  # fmt: skip
    assert pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(VocabError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_cli_export(tiny, tmp_path, capsys):
    from loraforge.cli import main

    out = tmp_path / "a.gguf"
    assert main(["export", "--format", "gguf", "--base", tiny["base"], "--adapter", tiny["lora"],
                 "--out", str(out), "--lora-only", "--type", "f32"]) == 0  # fmt: skip
    assert f"LoRA adapter written to {out}" in capsys.readouterr().out
    assert _field(gguf.GGUFReader(out), "adapter.type") == "lora"
    assert main(["export", "--base", tiny["base"], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "exists" in err and "\n" not in err


# -- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, tmp_path_factory):
    """SmolLM2 with a small random adapter; its merged f16 GGUF and the adapter's LoRA GGUF."""
    root = tmp_path_factory.mktemp("smollm2")
    model, tokenizer = load_with_adapters(smollm2_dir, {}, "float32", "cpu")
    adapter = _save_adapter(model, root / "lora", std=0.02, target_modules=["q_proj", "k_proj", "v_proj"])
    merged = export_gguf(smollm2_dir, root / "merged-f16.gguf", adapter=str(adapter), type="f16")
    lora = export_gguf(smollm2_dir, root / "lora-f16.gguf", adapter=str(adapter), type="f16", lora_only=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True)  # fmt: skip
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    want = _logits(_merged(smollm2_dir, str(adapter)), ids)
    return {"dir": smollm2_dir, "adapter": str(adapter), "merged": merged, "lora": lora, "ids": ids,
            "want": want, "tokenizer": tokenizer, "root": root}  # fmt: skip


def test_smollm2_vocab_and_transformers_logits(smollm2):
    """The real BPE vocabulary and chat template, and transformers' reading of the merged f16 file
    gives loraforge's next-token logits within 1e-2 (relative)."""
    from transformers import AutoModelForCausalLM

    reader = gguf.GGUFReader(smollm2["merged"])
    tok = smollm2["tokenizer"]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert (
        len(tokens) == 49152 and tokens[1] == "<|im_start|>" and tokens[300] == tok.convert_ids_to_tokens(300)
    )
    assert len(_field(reader, "tokenizer.ggml.merges")) == 48900
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == 2
    assert "output.weight" not in {t.name for t in reader.tensors}  # (tied: llama.cpp reuses token_embd)
    root, name = os.path.split(smollm2["merged"])
    back = AutoModelForCausalLM.from_pretrained(root, gguf_file=name, dtype=torch.float32).eval()
    assert _rel(_logits(back, smollm2["ids"])[-1], smollm2["want"][-1]) <= 1e-2
    assert int(_logits(back, smollm2["ids"])[-1].argmax()) == int(smollm2["want"][-1].argmax())


# -- llama.cpp itself -------------------------------------------------------------------------


def _llama_cpp_logits(llama_cpp, path, ids, lora=None) -> np.ndarray:
    model = llama_cpp.Llama(model_path=str(path), lora_path=lora and str(lora), logits_all=True,
                            n_ctx=256, n_threads=1, verbose=False)  # fmt: skip
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)])
    finally:
        model.close()


def test_llama_cpp_tiny(tiny, tmp_path):
    """llama.cpp loads the merged f16 GGUF, and the f32 base with the LoRA GGUF (rsLoRA with a rank
    pattern: the folded scalings), and gives loraforge's next-token logits within 1e-2."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    want = _logits(_merged(tiny["base"], tiny["rslora"])).numpy()
    merged = export_gguf(tiny["base"], tmp_path / "m.gguf", adapter=tiny["rslora"], type="f16")
    base = export_gguf(tiny["base"], tmp_path / "b.gguf", type="f32")
    lora = export_gguf(tiny["base"], tmp_path / "a.gguf", adapter=tiny["rslora"], type="f32", lora_only=True)
    assert _rel(_llama_cpp_logits(llama_cpp, merged, IDS), want) <= 1e-2
    assert _rel(_llama_cpp_logits(llama_cpp, base, IDS, lora), want) <= 1e-2
    assert _rel(_llama_cpp_logits(llama_cpp, base, IDS), want) > 1e-1  # (the adapter counts)


def test_llama_cpp_smollm2(smollm2):
    """SmolLM2: llama.cpp's tokenization of a chat prompt equals the tokenizer's, and its next-token
    logits from the merged f16 GGUF and from an f16 base + the LoRA GGUF are loraforge's within 1e-2."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ids, want = smollm2["ids"], smollm2["want"].numpy()
    text = smollm2["tokenizer"].decode(ids)
    vocab_only = llama_cpp.Llama(model_path=str(smollm2["merged"]), vocab_only=True, verbose=False)
    try:
        assert vocab_only.tokenize(text.encode(), add_bos=False, special=True) == ids
    finally:
        vocab_only.close()
    assert _rel(_llama_cpp_logits(llama_cpp, smollm2["merged"], ids)[-1], want[-1]) <= 1e-2
    base = export_gguf(smollm2["dir"], smollm2["root"] / "base-f16.gguf", type="f16")
    got = _llama_cpp_logits(llama_cpp, base, ids, smollm2["lora"])
    assert _rel(got[-1], want[-1]) <= 1e-2


SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 4.0},
}  # fmt: skip


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_llama_cpp_rope_scaling(tmp_path, scaling):
    """Llama 3 RoPE scaling (Llama 3.1 / 3.2) goes as llama.cpp's rope_freqs tensor, linear scaling as
    the rope.scaling keys: llama.cpp's logits equal transformers' (for Llama 3 a short original
    context, so that the scaled frequencies matter at 24 tokens), and differ without the scaling."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.training.builtin import build_tokenizer

    torch.manual_seed(0)
    rope = {**SCALINGS[scaling], "rope_theta": 500000.0}
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, rope_parameters=rope, tie_word_embeddings=False,
        initializer_range=0.3,  # (sharp attention: positions matter)
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    out = export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf", type="f32")
    reader = gguf.GGUFReader(out)
    if scaling == "llama3":
        factors = {t.name: _values(t) for t in reader.tensors}["rope_freqs.weight"]
        assert factors.shape == (16,) and 1.0 < factors[0] < 8.0 == factors[-1]  # (smoothed .. factor)
    else:
        assert _field(reader, "llama.rope.scaling.type") == "linear"
        assert _field(reader, "llama.rope.scaling.factor") == 4.0
    ids = [(7 * i + 3) % 500 for i in range(24)]
    got = _llama_cpp_logits(llama_cpp, out, ids)
    assert _rel(got, _logits(model, ids).numpy()) <= 5e-3  # (llama.cpp f32 vs torch f32: ~2e-3 here)
    plain_rope = {"rope_type": "default", "rope_theta": 500000.0}
    plain = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "rope_parameters": plain_rope})).eval()
    plain.load_state_dict(model.state_dict())
    assert _rel(got, _logits(plain, ids).numpy()) > 5e-2


def test_adapter_tokenizer_and_chat_template(tiny, tmp_path):
    """The tokenizer saved with the adapter (its chat template: what training used) is the one written."""
    from transformers import AutoTokenizer

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["lora"], adapter)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(adapter)
    out = export_gguf(tiny["base"], tmp_path / "m.gguf", adapter=str(adapter), type="f16")
    assert _field(gguf.GGUFReader(out), "tokenizer.chat_template") == tok.chat_template


def test_mistral_as_llama(tmp_path):
    """Mistral is written as llama.cpp's ``llama`` (as its converter does); transformers reads it back."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    from loraforge.training.builtin import build_tokenizer

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    out = export_gguf(str(tmp_path / "m"), tmp_path / "m.gguf", type="f32")
    assert _field(gguf.GGUFReader(out), "general.architecture") == "llama"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    assert _rel(_logits(back.eval()), _logits(model)) <= 1e-5
