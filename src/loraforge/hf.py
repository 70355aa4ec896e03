"""Load and save transformers model directories, streaming weights and quantizing them on arrival.

``load_model(path, quantization=QuantConfig(...))`` builds the model from ``config.json`` with every
parameter on the meta device (buffers are real: they are small and some, like rotary frequencies,
are computed at construction), swaps the linear layers for empty :class:`Linear4bit` shells, then
reads the safetensors one tensor at a time and quantizes each linear weight as it arrives. Peak
memory is the quantized model plus one full-precision tensor, not the full-precision model.

A directory saved by transformers + bitsandbytes in 4-bit (``quantization_config`` in
``config.json``, bitsandbytes' ``weight.absmax`` / ``weight.quant_state.*`` keys) loads into the
same ``Linear4bit`` modules bit for bit; ``save_model`` writes that format back. Only safetensors
are read: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .quant import Linear4bit, QuantConfig
from .quant.linear4bit import _is_linear, quantize

__all__ = ["load_model", "save_model"]

_QUANT_KEY = ".weight.quant_state.bitsandbytes__"


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every ``nn.Parameter`` on the meta device while the model is built (buffers stay real)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found {pickled}: pickle files are never loaded; convert them to safetensors)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{path}: no *.safetensors weights{hint}")
    return files


def _build_skeleton(path: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    raw_qc = getattr(config, "quantization_config", None)
    if raw_qc is not None:
        delattr(config, "quantization_config")  # we build plain modules and quantize them ourselves
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    with _parameters_on_meta():
        if model_cls is not None:
            model = model_cls(config)
        else:
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = transformers.AutoModel.from_config(config)
    if raw_qc is not None and not isinstance(raw_qc, dict):
        raw_qc = raw_qc.to_dict()
    return model, raw_qc


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    # A handle per tensor: safe_open memory-maps the file and every page read through a handle stays
    # resident until it closes, so one long-lived handle would hold the whole file in RSS.
    with safe_open(file, framework="pt", device="cpu") as f:
        return f.get_tensor(key)


def _keys_by_file(files: list[Path]) -> list[tuple[Path, list[str]]]:
    from safetensors import safe_open

    out = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            out.append((file, list(f.keys())))
    return out


def _owner(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The longest prefix of ``name`` (a dotted key) that names one of ``modules``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor, dtype, device) -> bool:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    if t.is_floating_point() and dtype is not None:
        t = t.to(dtype)
    if attr in module._parameters and module._parameters[attr] is not None:
        old = module._parameters[attr]
        if old.shape != t.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)}, model expects {tuple(old.shape)}")
        module._parameters[attr] = nn.Parameter(t.to(device), requires_grad=old.requires_grad)
        return True
    if attr in module._buffers:
        module._buffers[attr] = t.to(device)
        return True
    return False


def load_model(path, quantization: QuantConfig | dict | None = None, dtype=None, device=None) -> nn.Module:
    """Load a transformers model directory (``config.json`` + safetensors, sharded or not).

    Args:
        path: the directory.
        quantization: a :class:`QuantConfig` (or its kwargs) to quantize every linear layer but
            ``skip_modules`` while streaming. A directory saved in bitsandbytes 4-bit is loaded as
            stored whatever this says (its compute dtype is taken from here when given).
        dtype: cast floating weights to this dtype (quantization then happens from it).
        device: where the model lives (weights are quantized there, e.g. on the GPU).

    Returns the model in eval mode. Raises ``ValueError`` naming the tensor when a quantized
    checkpoint's state is missing or inconsistent, ``KeyError`` listing weights the checkpoint lacks.
    """
    path = Path(path)
    if isinstance(quantization, dict):
        quantization = QuantConfig(**quantization)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    files = _keys_by_file(_checkpoint_files(path))
    all_keys = [k for _, keys in files for k in keys]

    model, raw_qc = _build_skeleton(path)
    prefix = getattr(model, "base_model_prefix", "")
    own = dict(model.state_dict(keep_vars=True))

    def resolve(key: str) -> str:
        # Checkpoints of a bare encoder may lack (or carry) the base model prefix, as in transformers.
        if key in own or _owner(key, lin4) or not prefix:
            return key
        if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in own:
            return key[len(prefix) + 1 :]
        return f"{prefix}.{key}" if f"{prefix}.{key}" in own else key

    lin4: dict[str, Linear4bit] = {}
    prequantized = sorted({k.split(_QUANT_KEY)[0] for k in all_keys if _QUANT_KEY in k})
    if prequantized:
        stored = QuantConfig.from_transformers(raw_qc) if raw_qc else QuantConfig(skip_modules=[])
        if quantization is not None:
            stored.compute_dtype = quantization.compute_dtype
        for key_prefix in prequantized:
            name = resolve(key_prefix + ".weight").removesuffix(".weight")
            module = _get(model, name, key_prefix + ".weight")
            if not _is_linear(module):
                raise ValueError(
                    f"{key_prefix}.weight: quantized in the checkpoint but {name} is a {type(module)}"
                )
            lin4[name] = _replace(model, name, Linear4bit.from_linear(module, stored))
    elif quantization is not None:
        quantize(model, quantization)
        lin4 = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    own = dict(model.state_dict(keep_vars=True))  # names after the swap

    # Stream: plain tensors are installed at once; a Linear4bit's tensors are gathered until all of
    # its keys have arrived (they may sit in different shards), then quantized or unpacked.
    expected: dict[str, set] = {}
    for key in all_keys:
        name = resolve(key)
        owner = _owner(name, lin4)
        if owner is not None:
            expected.setdefault(owner, set()).add(name[len(owner) + 1 :])
    pending: dict[str, dict] = {}
    unexpected = []
    for file, keys in files:
        for key in keys:
            name = resolve(key)
            t = _read_tensor(file, key)
            owner = _owner(name, lin4)
            if owner is None:
                if not _set_tensor(model, name, t, dtype, device):
                    unexpected.append(key)
                continue
            rel = name[len(owner) + 1 :]
            if rel == "weight" and t.is_floating_point():
                t = t.to(device, dtype) if dtype is not None else t.to(device)
            elif rel == "bias" and dtype is not None:
                t = t.to(dtype)
            pending.setdefault(owner, {})[rel] = t
            if pending[owner].keys() == expected[owner]:
                _fill_linear4bit(lin4[owner], pending.pop(owner), owner, device)
    if unexpected:
        warnings.warn(
            f"load_model: {len(unexpected)} checkpoint tensors unused: {unexpected[:8]}", stacklevel=2
        )

    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, m in lin4.items() if m.quant_state is None]
    if missing:
        raise KeyError(
            f"load_model: {path} lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    model.to(device)  # the buffers built at construction
    if dtype is not None and getattr(model, "config", None) is not None:
        model.config.dtype = dtype  # what save_model writes back, as from_pretrained(dtype=...) does
    return model.eval()


def _get(model: nn.Module, name: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{key}: the model has no module {name!r}") from None


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def _fill_linear4bit(module: Linear4bit, tensors: dict, name: str, device) -> None:
    module.load_tensors_({k: v.to(device) for k, v in tensors.items()}, name=f"{name}.weight")


def _quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The 4-bit config of a model holding Linear4bit layers (``None`` if it has none)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    first = layers[0]
    kinds = {(m.quant_type, m.blocksize, m.double_quant) for m in layers}
    if len(kinds) > 1:
        raise ValueError(
            f"save_model: Linear4bit layers disagree on (quant_type, blocksize, double_quant): {kinds}"
        )
    # transformers quantizes every nn.Linear not matched by llm_int8_skip_modules (and only skips
    # lm_head by default when the list is null), so list exactly the layers left in full precision.
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return QuantConfig(first.quant_type, first.blocksize, first.double_quant, first.compute_dtype, kept)


def _atomic_write(target: Path, write) -> None:
    """Write via ``write(tmp_path)`` to a temporary file in the same directory, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_model(model: nn.Module, path) -> None:
    """Write ``model`` as a transformers directory: ``config.json`` + ``model.safetensors``.

    A model with :class:`Linear4bit` layers is saved in bitsandbytes' 4-bit format with
    ``quantization_config`` in ``config.json``, so ``transformers.AutoModelForCausalLM.from_pretrained``
    (+ bitsandbytes) and :func:`load_model` read it back. Tied weights are stored once. Each file is
    written to a temporary name and moved into place.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, {}
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:  # a tied weight: keep one name, preferring the tie's source
            if seen[key] in tied:
                tensors.pop(seen[key])
                seen[key] = name
                tensors[name] = t.to("cpu").contiguous()
            continue
        seen[key] = name
        tensors[name] = t.to("cpu").contiguous()
    _atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    config = getattr(model, "config", None)
    if config is None:
        return
    d = config.to_dict()
    d.pop("quantization_config", None)
    qc = _quant_config_of(model)
    if qc is not None:
        d["quantization_config"] = qc.to_transformers()
    text = json.dumps(d, indent=2, sort_keys=True) + "\n"
    _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))
