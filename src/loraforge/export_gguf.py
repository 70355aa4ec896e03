"""Export to GGUF for llama.cpp / Ollama: a merged model, or a LoRA adapter as llama.cpp loads it.

Written with the ``gguf`` package (llama.cpp's own Python writer, tensor-name map and Q8_0
quantizer), for the Llama-family architectures loraforge trains:

=========  ==================  ==========================================================
model      GGUF architecture   notes
=========  ==================  ==========================================================
llama      ``llama``           q/k rows permuted as llama.cpp's converter does (below)
mistral    ``llama``           (llama.cpp's converter writes Mistral as ``llama`` too)
qwen2      ``qwen2``           q/k/v biases; no permutation (llama.cpp's NeoX-style RoPE)
=========  ==================  ==========================================================

**Merged model** (:func:`export_model`): the base, with the adapter merged in by loraforge's own
:func:`loraforge.merge_and_unload` where one is given, as a GGUF model: ``general.*`` and
``<arch>.*`` hyperparameters (context length, embedding length, feed-forward length, block count,
head counts, RoPE dimension and base, RMS-norm epsilon, vocabulary size), the tokenizer
(:mod:`loraforge.export_gguf_vocab`) and every weight under llama.cpp's name
(``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``). Tensor types, as
llama.cpp's ``convert_hf_to_gguf.py`` picks them: 1-D tensors (norms, biases) F32; matrices F32,
F16 or Q8_0 (blocks of 32 values ``d * q``, int8 ``q``, fp16 ``d = max|x| / 127``; a matrix whose
rows are not a multiple of 32 long falls back to F16). A tied output head is not written
(llama.cpp reuses ``token_embd``). Llama 3's RoPE scaling becomes llama.cpp's ``rope_freqs``
tensor (:func:`rope_freq_factors`), linear scaling the ``rope.scaling.*`` keys.

**LoRA adapter** (:func:`export_lora`): llama.cpp's adapter GGUF (``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``), tensors ``<name>.lora_a`` (A, r x in: GGUF
shape ``[in, r]``) and ``<name>.lora_b`` (B, out x r: ``[r, out]``) beside the base tensor
``<name>``. llama.cpp adds ``alpha / r * B A x`` per layer (r: that layer's rank); a layer whose
loraforge scaling differs (rsLoRA's ``alpha / sqrt(r)``, ``alpha_pattern``) gets the ratio folded
into its B, so every layer adds exactly loraforge's ``scaling * B A x``.

**Why the q/k permutation.** Hugging Face Llama checkpoints apply RoPE to the two halves of each
head (``rotate_half``); llama.cpp's ``llama`` graph rotates adjacent pairs. llama.cpp's converter
reorders the rows of ``q_proj`` / ``k_proj`` within each head, ``(2, d/2) -> (d/2, 2)``, so that
its pairs are Hugging Face's halves; a LoRA B of those layers gets the same row order (its A is
unchanged). transformers undoes it when it reads a llama GGUF.

Refused in one line, nothing written: other architectures, other RoPE scalings (YaRN, dynamic,
...), a base saved quantized (export from its full-precision original), and for the LoRA GGUF:
DoRA, ``lora_bias``, ``modules_to_save``, LoRA on embeddings or a tied output head, other methods.
The file is written beside ``out`` and renamed into place; an existing ``out`` is not overwritten.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

# model_type -> (gguf MODEL_ARCH member name, permute q/k for llama.cpp's RoPE)
ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
TYPES = ("f16", "q8_0", "f32")


class ExportError(ValueError):
    """The model or adapter cannot be written as GGUF (one line, naming what and why)."""


def _types(kind: str):
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    table = {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}
    if kind not in table:
        raise ExportError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    return table[kind]


def _arch(config) -> tuple[object, bool]:
    """(gguf.MODEL_ARCH, permute q/k) for a transformers config; ExportError for others."""
    import gguf

    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise ExportError(
            f"model type {kind!r} cannot be exported to GGUF by loraforge (supported: {', '.join(ARCHS)})"
        )
    name, permute = ARCHS[kind]
    return getattr(gguf.MODEL_ARCH, name), permute


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each of ``n_head`` heads of ``d`` rows, row ``h*d + j*d/2
    + i`` (half j, index i) moves to ``h*d + 2i + j``. ``w`` is (n_head*d, ...) (a weight, a bias or
    a LoRA B)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _rope_scaling(config) -> tuple[str, float]:
    """("none" | "linear" | "llama3", factor); ExportError for the kinds not written here."""
    params = _rope_params(config)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return "none", 1.0
    if kind in ("linear", "llama3"):
        return kind, float(params.get("factor", 8.0 if kind == "llama3" else 1.0))
    raise ExportError(
        f"RoPE scaling {kind!r} is not supported by loraforge's GGUF export (none, linear, llama3)"
    )


def _rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params if isinstance(params, dict) else {}


def rope_freq_factors(config) -> torch.Tensor | None:
    """Llama 3's RoPE scaling as llama.cpp takes it: a ``rope_freqs`` tensor of head_dim / 2
    divisors of the rotation frequencies ``theta^(-2i/d)``. With wavelength ``2 pi / freq`` and the
    pre-extension context ``L``: 1 where the wavelength < L / high_freq_factor, ``factor`` where it
    > L / low_freq_factor, and in between ``1 / ((1 - s) / factor + s)``, ``s = (L / wavelength -
    low) / (high - low)`` (transformers' ``_compute_llama3_parameters``). None for other models."""
    params = _rope_params(config)
    if (params.get("rope_type") or params.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old / high, torch.ones_like(out), out)
    out = torch.where(wavelen > old / low, torch.full_like(out, factor), out)
    return out.to(torch.float32)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer, config, file_type) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for a Llama-family model."""
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind, factor = _rope_scaling(config)
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_file_type(file_type)


def _gguf_name(name_map, name: str) -> str:
    new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ExportError(f"tensor {name!r} has no llama.cpp name for this architecture")
    return new


def _q_or_k(name: str, config) -> int | None:
    """The head count to permute ``name``'s rows by (q: attention heads, k: KV heads), else None."""
    if ".self_attn.q_proj." in name:
        return int(config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def _encode(writer, name: str, data: torch.Tensor, qtype) -> None:
    """Add one tensor: 1-D (norms, biases) as F32, matrices as ``qtype`` (Q8_0 falls back to F16
    where a row is not a whole number of blocks, as llama.cpp's converter does)."""
    import gguf

    arr = data.detach().to(torch.float32).contiguous().numpy()
    q = gguf.GGMLQuantizationType
    if arr.ndim <= 1 or name.endswith("_norm.weight") or qtype == q.F32:
        writer.add_tensor(name, arr.astype(np.float32))
    elif qtype == q.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        try:
            writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        except gguf.QuantError:
            writer.add_tensor(name, arr.astype(np.float16))


def _general(writer, config, kind: str) -> None:
    writer.add_type(kind)
    name = str(getattr(config, "_name_or_path", "") or "").rstrip("/").split("/")[-1]
    if name:
        writer.add_name(name)


def _finish(writer, out: Path) -> Path:
    """Write the file beside ``out`` and rename it into place."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _check_out(out) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out (an existing file is not overwritten)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory for --out")
    return out


def _refuse_4bit(base: str) -> None:
    from .pretrained import resolve
    from .training import builtin

    if builtin.is_builtin(base):
        return
    cfg = Path(str(resolve(base))) / "config.json"
    if cfg.is_file():
        try:
            raw = json.loads(cfg.read_text())
        except ValueError:
            return  # (load_with_adapters names the bad file)
        qc = raw.get("quantization_config") if isinstance(raw, dict) else None
        if qc:
            method = qc.get("quant_method", "4-bit") if isinstance(qc, dict) else "4-bit"
            raise ExportError(
                f"{cfg}: the base is saved quantized ({method}); GGUF export needs "
                "full-precision weights: export from the full-precision base (a QLoRA adapter applies to "
                "it as well)"
            )


def _load(base: str, adapter: str | None, dtype: str = "float32"):
    from .training.inference import load_with_adapters

    _refuse_4bit(base)
    return load_with_adapters(base, {"default": adapter} if adapter else {}, dtype, "cpu")


def export_model(base: str, out, adapter: str | None = None, type: str = "f16") -> Path:
    """Write ``base`` (with ``adapter`` merged in, if given) to the GGUF file ``out`` with matrices
    in ``type`` (f16, q8_0, f32). Returns ``out``."""
    import gguf

    from .adapters import merge_and_unload
    from .injection import adapter_layers

    qtype, file_type = _types(type)
    out = _check_out(out)
    model, tokenizer = _load(base, adapter)
    config = model.config
    arch, permute = _arch(config)
    _rope_scaling(config)  # (refused before the merge)
    if adapter is not None:
        model = merge_and_unload(model, dequantize=True, safe=True)
    if any(True for _ in adapter_layers(model)):
        raise ExportError("the model still holds adapters after the merge")
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    _general(writer, config, gguf.GGUFType.MODEL)
    _write_hparams(writer, config, file_type)
    from .export_gguf_vocab import add_vocab

    add_vocab(writer, tokenizer, int(config.vocab_size))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    name_map = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # (llama.cpp uses token_embd where there is no output.weight)
        if "rotary_emb" in name:
            continue  # (computed from the hyperparameters; Llama 3 scaling: rope_freqs below)
        data = tensor
        heads = _q_or_k(name, config) if permute else None
        if heads is not None:
            data = permute_rows(data, heads)
        _encode(writer, _gguf_name(name_map, name), data, qtype)
    factors = rope_freq_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    return _finish(writer, out)


def _lora_layers(model, adapter_name: str):
    """(path, A, B, scaling) for each LoRA layer of the adapter; ExportError for what llama.cpp's
    LoRA GGUF cannot hold."""
    from .injection import adapter_layers, saved_modules
    from .layers import LoraLayer, dora
    from .layers.linear import LoraLinear
    from .registry import registry

    cfg = registry(model).configs[adapter_name]
    if type(cfg).__name__ != "LoraConfig":
        raise ExportError(f"{type(cfg).__name__} adapters have no llama.cpp LoRA GGUF form; export merged")
    if any(adapter_name in m.modules_to_save for _, m in saved_modules(model)):
        raise ExportError("the adapter trains whole modules (modules_to_save); export it merged")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for path, layer in adapter_layers(model):
        if adapter_name not in layer.adapters:
            continue
        why = None
        if not isinstance(layer, LoraLinear) or not isinstance(layer.base_layer, nn.Linear):
            why = f"LoRA on a {type(layer.base_layer).__name__}"
        elif dora.is_dora(layer, adapter_name):
            why = "DoRA"
        elif layer.lora_bias_param(adapter_name) is not None:
            why = "lora_bias"
        elif tied and path == "lm_head":
            why = "LoRA on a tied output head"
        if why is not None or not isinstance(layer, LoraLayer):
            raise ExportError(
                f"layer {path!r}: {why or layer.method} has no llama.cpp LoRA GGUF form; export merged"
            )
        a, b = layer.factors(adapter_name)
        yield path, a.detach().float(), b.detach().float(), float(layer.scaling[adapter_name])


def export_lora(base: str, adapter: str, out, type: str = "f16") -> Path:
    """Write ``adapter`` (trained on ``base``) as llama.cpp's LoRA-adapter GGUF ``out``; its
    factors in ``type`` (f16, q8_0, f32). Returns ``out``."""
    import gguf

    qtype, file_type = _types(type)
    out = _check_out(out)
    # (the base's weights only carry the factors: bf16 halves the memory; the factors over a
    # half-precision weight are fp32, loaded exactly: layers.base.lora_dtype)
    model, _ = _load(base, adapter, "bfloat16")
    config = model.config
    arch, permute = _arch(config)
    layers = list(_lora_layers(model, "default"))
    if not layers:
        raise ExportError(f"{adapter}: the adapter adapts no layer")
    from .registry import registry

    alpha = float(registry(model).configs["default"].alpha)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    _general(writer, config, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    name_map = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    for path, a, b, scaling in layers:
        r = a.shape[0]
        llama_scale = alpha / r if alpha else 1.0  # (llama.cpp: alpha 0 means scale 1)
        if not math.isclose(scaling, llama_scale, rel_tol=1e-7):
            b = b * (scaling / llama_scale)
        heads = _q_or_k(path + ".", config) if permute else None
        if heads is not None:
            b = permute_rows(b, heads)
        name = _gguf_name(name_map, path + ".weight")
        _encode(writer, name + ".lora_a", a, qtype)
        _encode(writer, name + ".lora_b", b, qtype)
    return _finish(writer, out)


def export_gguf(
    base: str, out, adapter: str | None = None, type: str = "f16", lora_only: bool = False
) -> Path:
    """``loraforge export --format gguf``: the merged model, or with ``lora_only`` the adapter alone."""
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise ExportError("GGUF export needs the gguf package (pip install gguf)") from None
    if lora_only:
        if adapter is None:
            raise ExportError("--lora-only needs --adapter")
        return export_lora(base, adapter, out, type)
    return export_model(base, out, adapter, type)


__all__ = ["ExportError", "export_gguf", "export_lora", "export_model", "permute_rows"]
