"""The model for ``train.distributed: fsdp``, loaded without any process holding all of it.

Every process runs the same sequence::

    skeleton: parameters on the meta device (4-bit: empty Linear4bit shells), no memory
    adapter injected: real factors on the device (``layers.base.factors_on``), drawn as a
        single-process load draws them (same seed, same order: the random draws never read the
        base weight)
    for each decoder layer, in order:
        read its tensors one at a time (4-bit targets quantized on arrival; a bitsandbytes 4-bit
        directory installed as stored); what injection computes from the weights, without any
        random draw (PiSSA / OLoRA factors, DoRA magnitudes), is computed now; then shard it
        (``fsdp.shard_layer``): the process keeps 1/W of each tensor and the full ones are freed
    the root tensors (embeddings, final norm, head) whole; the caller shards the root
        (``fsdp.shard_model`` skips the layers sharded here)

so a process's peak is its shards + one full-precision decoder layer + the root tensors, not the
whole model (``report.peak_host_bytes``; the test measures it against a whole load).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..injection import inject
from ..layers import LoraLayer, dora
from ..layers.base import factors_on
from ..model_files import _MissingWeights, _read_tensor, _skeleton, model_dir
from ..pretrained import base_name
from ..quant import Linear4bit
from . import builtin, fsdp
from .config import ConfigError, TrainConfig
from .dist import DistInfo

# LoRA inits refused: LoftQ replaces each base weight by its quantization at injection and checks
# every target first. (PiSSA / OLoRA, an SVD / QR of each weight, and DoRA's magnitude, its norm, are
# computed once each layer's weights are in, before it is sharded: _init_from_base.)
_FROM_WEIGHTS = ("loftq",)


def check_supported(cfg: TrainConfig) -> None:
    """Refuse, before anything is loaded, adapter options a sharded load cannot initialise."""
    if cfg.method == "full":
        return
    lora = cfg.lora
    if lora.init in _FROM_WEIGHTS:
        raise ConfigError(
            f"lora.init: {lora.init!r} replaces every base weight by its quantization at injection, "
            "before train.distributed: fsdp has loaded any; initialise in one process first "
            "(train.distributed: ddp), or use init default, gaussian, pissa or olora"
        )
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters"):
        if getattr(lora, key, None):
            raise ConfigError(
                f"lora.{key}: copies base weights into the adapter at injection, before train.distributed: "
                "fsdp has read them; use train.distributed: ddp"
            )


def load_sharded(cfg: TrainConfig, dist: DistInfo, log=print) -> nn.Module:
    """The model of ``cfg`` for FSDP on this process: the adapter injected (lora, qlora) or every
    parameter trainable (full); every decoder layer an FSDP unit holding 1/W of its tensors; the
    root tensors whole (to be sharded with the loss module by ``fsdp.shard_model``)."""
    from .modeling import adapter_config, load_base_model, resolve_dtype

    check_supported(cfg)
    device = dist.device
    if builtin.is_builtin(cfg.model.path):
        # Built-in models are tiny and made in Python from a seed: built whole (as a single process
        # builds them), adapted, then sharded layer by layer.
        model = load_base_model(cfg.model, device, quantize=cfg.method == "qlora")
        _adapt(model, cfg, adapter_config, device)
        for layer in fsdp.decoder_layers(model):
            fsdp.shard_layer(layer, cfg.train.fsdp, dist.mesh, device)
        return model

    dtype = resolve_dtype(cfg.model.dtype, device)
    qc = cfg.model.quantization.resolved(dtype) if cfg.method == "qlora" else None
    path = model_dir(cfg.model.path)
    files, model, stream = _skeleton(path, qc, dtype, device)
    if cfg.model.attn_implementation:
        model.set_attn_implementation(cfg.model.attn_implementation)
    _adapt(model, cfg, adapter_config, device)

    layers = fsdp.decoder_layers(model)
    layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    groups: list[list[tuple[Path, str]]] = [[] for _ in range(len(layers) + 1)]  # the last: root
    for file, keys in files:
        for key in keys:
            groups[layer_of.get(id(stream.module_of(key)), len(layers))].append((file, key))

    names = {id(m): n for n, m in model.named_modules()}
    for i, layer in enumerate(layers):
        for file, key in groups[i]:
            stream.put(file, key, _read_tensor(file, key))
        _init_from_base(layer)
        _check_loaded(layer, names[id(layer)] + ".", path)
        fsdp.shard_layer(layer, cfg.train.fsdp, dist.mesh, device)
    for file, key in groups[-1]:
        stream.put(file, key, _read_tensor(file, key))
    if stream.unexpected:
        warnings.warn(
            f"load_sharded: {len(stream.unexpected)} checkpoint tensors unused: {stream.unexpected[:8]}",
            stacklevel=2,
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _init_from_base(model)  # (an adapted module outside the layers, e.g. the head)
    _check_loaded(model, "", path)
    for module in model.modules():  # the buffers built at construction (a layer's moved with it)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)
    model.config.dtype = dtype
    name = base_name(cfg.model.path)
    if name is not None:  # the adapter's base_model_name_or_path: the original's hub id, not the cache
        model.config._name_or_path = name
    log(f"loaded {path} sharded: {len(layers)} decoder layers over {dist.world_size} processes")
    return model.eval()


def _adapt(model: nn.Module, cfg: TrainConfig, adapter_config, device: torch.device) -> None:
    """Make ``model`` trainable as ``cfg.method`` says, before its weights arrive: every parameter
    for full (the loaded tensors keep the flag), else the adapter injected with real factors on
    ``device`` over the meta base."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    with factors_on(device):
        inject(model, adapter_config(cfg))
    on_meta = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.device.type == "meta" and dora.MAGNITUDE not in n  # (see _dora_magnitudes)
    ]
    if on_meta:  # (an adapter kind that copies base tensors: check_supported should have refused it)
        raise ConfigError(
            f"method {cfg.method}: adapter tensors {on_meta[:4]} depend on base weights not loaded yet; "
            "use train.distributed: ddp"
        )


def _init_from_base(layer: nn.Module) -> None:
    """What injection could not compute over the meta base, now that ``layer``'s base weights are
    loaded, in injection's order: PiSSA / OLoRA factors (and residual base weights), then DoRA's
    magnitudes m = ‖W0 + s·B·A‖. Neither makes a random draw, so the values are a single
    process's."""
    for module in layer.modules():
        if not isinstance(module, LoraLayer):
            continue
        module.init_from_base()
        for name, mag in list((module._modules.get(dora.MAGNITUDE) or {}).items()):
            if mag.weight.device.type == "meta":
                dora.add_magnitude(module, name)
                module.lora_magnitude_vector[name].weight.requires_grad_(mag.weight.requires_grad)


def _check_loaded(module: nn.Module, prefix: str, path: Path) -> None:
    """Raise (as ``load_model`` does) naming the parameters of ``module`` no checkpoint tensor filled."""
    missing = [prefix + n for n, p in module.named_parameters() if p.device.type == "meta"]
    missing += [
        prefix + n
        for n, m in module.named_modules()
        if isinstance(m, Linear4bit) and m.quant_state is None and m.weight.device.type != "meta"
    ]
    if missing:
        raise _MissingWeights(
            f"load_sharded: {path} lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
