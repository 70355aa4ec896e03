"""``lf.load_model`` / ``lf.save_model``: transformers directories, bitsandbytes 4-bit, streaming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from quant.util import minilm_dir, tiny_llama
from torch import nn

import loraforge as lf
from loraforge.quant import Linear4bit, QuantConfig

QC32 = QuantConfig(compute_dtype=torch.float32)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def bnb_dirs(tmp_path_factory):
    """A tiny Llama saved in full precision, and as transformers + bitsandbytes save it in 4-bit."""
    pytest.importorskip("bitsandbytes", reason="saving a 4-bit checkpoint needs bitsandbytes")
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loading needs accelerate")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb")
    tiny_llama(seed=0).save_pretrained(root / "fp")
    bc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    q = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=bc, device_map="cpu")
    q.save_pretrained(root / "q4")
    return root


def bnb_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    # Train mode, as PEFT training runs it: bitsandbytes dequantizes and multiplies. (In eval mode on
    # an AVX512-BF16 CPU it repacks the weight for a bf16 inference kernel with other numerics.)
    model.train()
    with torch.no_grad():
        return model(ids).logits, model


def test_loads_transformers_bitsandbytes_4bit_checkpoint_bit_exact(bnb_dirs):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    want, theirs = bnb_logits(bnb_dirs / "q4", ids)
    ours = lf.load_model(bnb_dirs / "q4")
    layer = ours.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear4bit) and layer.quant_state.nested and layer.compute_dtype == torch.float32
    assert type(ours.lm_head) is nn.Linear
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        got = ours(ids).logits
    assert rel_err(got, want) <= 1e-4


def test_quantize_on_load_equals_transformers_bitsandbytes(bnb_dirs):
    ours = lf.load_model(bnb_dirs / "fp", quantization=QC32)
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(bnb_dirs / "q4", device_map="cpu")
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_save_model_loads_back_in_transformers_bitsandbytes(bnb_dirs, tmp_path):
    ours = lf.load_model(bnb_dirs / "fp", quantization=QC32)
    lf.save_model(ours, tmp_path / "out")
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["config.json", "model.safetensors"]  # no temp files left behind
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True and qc["llm_int8_skip_modules"] == ["lm_head"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    want, theirs = bnb_logits(tmp_path / "out", ids)
    assert isinstance(theirs.model.layers[0].self_attn.q_proj, __import__("bitsandbytes").nn.Linear4bit)
    with torch.no_grad():
        got = ours(ids).logits
    assert rel_err(got, want) <= 1e-4
    again = lf.load_model(tmp_path / "out")
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), ours.state_dict().values()))


def test_full_precision_roundtrip_sharded_and_tied(tmp_path):
    model = tiny_llama(seed=1, tie=True)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = lf.load_model(tmp_path / "hf")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)
    lf.save_model(ours, tmp_path / "ours")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert "quantization_config" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_minilm_from_its_package_directory():
    from transformers import AutoModel

    path = minilm_dir()
    fp = lf.load_model(path)
    q = lf.load_model(path, quantization=QuantConfig(compute_dtype=torch.float32), dtype=torch.float32)
    assert sum(isinstance(m, Linear4bit) for m in q.modules()) == 37  # 36 encoder layers + pooler
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        ref = AutoModel.from_pretrained(path).eval()(ids).last_hidden_state
        a, b = fp(ids).last_hidden_state, q(ids).last_hidden_state
    assert torch.equal(a, ref)  # the streaming loader builds exactly transformers' model
    # NF4 noise on a 384-wide model (bitsandbytes' 4-bit model gives the same 0.973 here)
    assert torch.cosine_similarity(a.mean(1), b.mean(1)).item() > 0.95


def test_bad_checkpoints_fail_clearly(bnb_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = bnb_dirs / "q4"
    for name, edit, message in [
        ("no_absmax", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight.absmax"),
         r"model\.layers\.1\.mlp\.up_proj\.weight\.absmax: missing"),
        ("short_absmax", lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.weight.absmax",
                                                   sd["model.layers.0.self_attn.k_proj.weight.absmax"][:5]),
         r"model\.layers\.0\.self_attn\.k_proj\.weight\.absmax: 5 values"),
        ("short_packed", lambda sd: sd.__setitem__("model.layers.0.mlp.gate_proj.weight",
                                                   sd["model.layers.0.mlp.gate_proj.weight"][:-1].clone()),
         r"model\.layers\.0\.mlp\.gate_proj\.weight: 4095 packed bytes"),
    ]:  # fmt: skip
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text((src / "config.json").read_text())
        sd = load_file(src / "model.safetensors")
        edit(sd)
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            lf.load_model(out)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        lf.load_model(pickled)


STREAM_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch, safetensors
    import loraforge as lf
    from transformers import LlamaConfig, LlamaForCausalLM

    # the baseline includes the libraries and the model's code (imported on first use)
    LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=1))

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    t = time.perf_counter()
    model = lf.load_model(sys.argv[1], quantization=lf.QuantConfig(compute_dtype=torch.float32))
    print(json.dumps({"base": base, "peak": status("VmHWM"), "seconds": time.perf_counter() - t,
                      "linear4bit": sum(isinstance(m, lf.Linear4bit) for m in model.modules()),
                      "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}))
    """
)


@pytest.mark.slow  # a fresh process importing torch + transformers: 10-25 s on 2 busy cores
def test_streaming_load_peak_memory(tmp_path):
    """Issue item 4: loading with quantization streams. A 328 MiB fp32 Llama (84M parameters) is
    written one shard per layer; a fresh process loads it with NF4 and reports its peak RSS above its
    baseline (torch, transformers and the Llama code imported). It must stay below the full-precision
    size plus one layer; in fact it is about the loaded 4-bit model plus one tensor."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    random = {shape: torch.randn(shape, generator=g) * 0.02 for shape in set(shapes.values())}
    weight_map, fp_bytes, layer_bytes = {}, 0, {}
    groups: dict[str, list[str]] = {}
    for k in shapes:
        groups.setdefault(k.split(".")[2] if k.startswith("model.layers.") else "rest", []).append(k)
    for group, keys in groups.items():
        shard = f"model-{group}.safetensors"
        tensors = {k: random[shapes[k]].clone() for k in keys}  # clones: safetensors refuses shared memory
        save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
        size = sum(t.numel() * 4 for t in tensors.values())
        fp_bytes += size
        layer_bytes[group] = size
        weight_map.update(dict.fromkeys(keys, shard))
        del tensors
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    res = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    extra = out["peak"] - out["base"]
    one_layer = max(v for k, v in layer_bytes.items() if k != "rest")
    mb = 2**20
    print(f"\nstreaming NF4 load of a {fp_bytes / mb:.0f} MB fp32 model (one layer {one_layer / mb:.0f} MB) "
          f"into {out['model_bytes'] / mb:.0f} MB: peak RSS {extra / mb:.0f} MB above the "
          f"{out['base'] / mb:.0f} MB baseline, {out['seconds']:.1f} s")  # fmt: skip
    assert out["linear4bit"] == 8 * 7
    assert extra < fp_bytes + one_layer
    # in fact: the loaded model (4-bit layers, fp32 embeddings/head/norms) plus a tensor in flight
    assert extra < out["model_bytes"] + one_layer


def test_gpt2_conv1d_layers_quantize_like_transformers(tmp_path):
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored (in, out)); they quantize too."""
    pytest.importorskip("bitsandbytes", reason="compares with transformers + bitsandbytes")
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loading needs accelerate")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "fp")
    ours = lf.load_model(tmp_path / "fp", quantization=QC32)
    assert isinstance(ours.transformer.h[0].attn.c_attn, Linear4bit)
    bc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bc, device_map="cpu")
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    lf.save_model(ours, tmp_path / "q4")
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(lf.load_model(tmp_path / "q4")(ids).logits, ours(ids).logits)
