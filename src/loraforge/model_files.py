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

Files are untrusted input: a bad ``config.json``, index, safetensors file or 4-bit quant state
gives a ``ValueError`` that names the file (and the tensor or field), before any kernel sees it.
A model that cannot be found raises :class:`ModelNotFoundError` at once, in one line: the
directory does not exist, or the Hugging Face hub (for a hub id) is unreachable or lacks it; no
network retries (:func:`check_model_source`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write, atomic_write_text, read_json_object
from .kinds import replace_module
from .pretrained import PREFIX, base_name, gguf_file, is_pretrained, resolve, stand_in, unknown_builtin
from .quant import Linear4bit, QuantConfig
from .quant.linear4bit import is_quantizable, quantize

__all__ = ["ModelNotFoundError", "check_model_source", "load_model", "model_dir", "save_model"]

_QUANT_KEY = ".weight.quant_state.bitsandbytes__"
# what load_model reads of a hub snapshot
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
    """No model where ``model.path`` / ``--base`` points: no such directory, or a hub id that the
    hub (unreachable, offline, or without it) cannot give. The message is one line."""


class _MissingWeights(KeyError, ValueError):
    """The checkpoint lacks weights the model has (a ``KeyError``, as documented, and a
    ``ValueError``, which the CLI prints as one line); printed without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0])


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(
        str(f).strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags if f
    )


def _hub_id(source: str) -> str | None:
    """``source`` as a hub model id (``name`` or ``org/name``), or ``None`` where it can only be a
    path: not a valid id, or written like a path (``./x``, ``~/x``, ``/x``), or whose parent is
    a local directory (``runs/out`` with ``runs/`` here)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "~", "/", "\\")) or "\\" in source:
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    parent = Path(source).parent
    return None if str(parent) != "." and parent.is_dir() else source


def _cached_snapshot(repo: str) -> Path | None:
    """``repo``'s snapshot directory in the Hugging Face cache (the one ``refs/main`` names, else
    the newest), or ``None``."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    main = folder / "refs" / "main"
    if main.is_file() and (folder / "snapshots" / main.read_text().strip()).is_dir():
        return folder / "snapshots" / main.read_text().strip()
    found = sorted((folder / "snapshots").glob("*"), key=lambda d: d.stat().st_mtime)
    return found[-1] if found else None


# Remembered per process once the hub has answered: a training run checks the same id for its
# config, tokenizer and weights, and one request is enough (a failure raises, so is not kept).
@functools.lru_cache(maxsize=64)
def _probe_hub(source: str) -> None:
    """One request (no retries) for ``source``'s ``config.json``; ``ModelNotFoundError`` when the hub
    cannot be reached or has no such model. (A failed request without this would be retried by
    transformers for about 50 s before a multi-line traceback.)"""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(source, "config.json"), timeout=10)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{source}: a gated model on the Hugging Face hub; accept its terms on the hub and log in "
            "(hf auth login) to download it"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{source}: no such directory, and no model {source!r} on the Hugging Face hub "
            "(a private one needs: hf auth login)"
        ) from None
    except HfHubHTTPError:
        return  # the hub answered (e.g. no config.json at the top): transformers says what is wrong
    except Exception as e:  # connection refused, DNS, timeout, proxy: all mean "unreachable"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelNotFoundError(
            f"{source}: no such directory, and the Hugging Face hub cannot be reached to look for a model "
            f"of that name ({reason}); check the path, or connect, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from None


def check_model_source(source) -> None:
    """Fail fast, in one line, where ``source`` (a model or tokenizer directory, or a hub id) cannot
    be loaded: raises :class:`ModelNotFoundError` when it is neither an existing directory, nor a hub
    id in the local Hugging Face cache, nor (unless ``HF_HUB_OFFLINE`` is set) a model the hub has.
    Call it before ``from_pretrained``, which retries an unreachable hub for about 50 s and reports
    a path that does not exist as an invalid repo id."""
    text = str(source)
    if is_pretrained(text):
        gguf_file(text)  # the package or file is there (converted on first load)
        return
    if text.startswith(PREFIX):
        if text[len(PREFIX) :] not in _built_in_memory():
            raise ModelNotFoundError(unknown_builtin(text))
        raise ModelNotFoundError(
            f"{text}: built in memory by loraforge's training commands (loraforge train/generate/merge "
            "take it), not a model directory; load_model reads a directory, hub id, .gguf file or "
            f"{PREFIX}smollm2-135m-instruct"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelNotFoundError(f"{text}: a file, not a model directory")
    repo = _hub_id(text)
    if repo is None:
        raise ModelNotFoundError(f"{text}: no such directory")
    if _cached_snapshot(repo) is not None or stand_in(repo) is not None:
        return
    if _offline():
        raise ModelNotFoundError(
            f"{text}: no such directory, and not in the Hugging Face cache (HF_HUB_OFFLINE is set: "
            "the hub is not asked)"
        )
    _probe_hub(repo)


def _built_in_memory() -> list[str]:
    from .training.builtin import MODELS

    return list(MODELS)


def hub_copy_available(repo: str) -> bool:
    """Whether hub id ``repo`` can be had: in the Hugging Face cache, or (not offline) on the hub."""
    if _cached_snapshot(repo) is not None:
        return True
    if _offline():
        return False
    try:
        _probe_hub(repo)
    except ModelNotFoundError:
        return False
    return True


def model_dir(source) -> Path:
    """The local directory of model ``source``: ``source`` itself when it is a directory; for a hub
    id, its snapshot in the Hugging Face cache, downloaded (config, safetensors, tokenizer files)
    where the cache lacks the weights; for ``builtin:smollm2-135m-instruct`` or a ``.gguf`` file, the
    safetensors directory it is converted to once (:mod:`loraforge.pretrained`). Raises
    :class:`ModelNotFoundError` (see :func:`check_model_source`)."""
    check_model_source(source)
    if is_pretrained(str(source)) or stand_in(str(source)) is not None:
        return Path(resolve(str(source)))
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path
    snap = _cached_snapshot(str(source))
    if snap is not None and (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
        return snap
    if _offline():
        raise ModelNotFoundError(f"{source}: no safetensors weights in the Hugging Face cache (offline)")
    if snap is not None:
        _probe_hub(str(source))  # (cached, so not probed yet)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=_HUB_FILES))


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
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: field 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for f in files:  # only files of this directory (no "../" or absolute names)
            if Path(f).name != f or not f.endswith(".safetensors"):
                raise ValueError(f"{index}: weight_map names {f!r}, not a .safetensors file in {path}")
            if not (path / f).is_file():
                raise FileNotFoundError(f"{index}: weight_map names {f}, which is missing from {path}")
        return [path / f for f in files]
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

    read_json_object(path / "config.json")  # (transformers' own message for a bad file is an OSError)
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


def _unreadable(file: Path, e: Exception, key: str | None = None) -> ValueError:
    what = f" (tensor {key})" if key else ""
    return ValueError(f"{file}: not a readable safetensors file{what}: {' '.join(str(e).split())}")


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    # A handle per tensor: safe_open memory-maps the file and every page read through a handle stays
    # resident until it closes, so one long-lived handle would hold the whole file in RSS.
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return f.get_tensor(key)
    except Exception as e:  # safetensors' SafetensorError (a truncated or corrupt file), OSError
        raise _unreadable(file, e, key) from None


def _keys_by_file(files: list[Path]) -> list[tuple[Path, list[str]]]:
    """Each file's tensor names; opening checks the header (its length, JSON, that the offsets
    cover the file exactly), so a truncated file is refused here, naming it."""
    from safetensors import safe_open

    out = []
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                out.append((file, list(f.keys())))
        except Exception as e:
            raise _unreadable(file, e) from None
    return out


def _owner(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The longest prefix of ``name`` (a dotted key) that names one of ``modules``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _set_tensor(module: nn.Module, attr: str, t: torch.Tensor, dtype, device, name: str) -> bool:
    """Install ``t`` as ``module``'s parameter or buffer ``attr`` (checkpoint name ``name``); False
    when the module has no such tensor."""
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


def _skeleton(path: Path, quantization: QuantConfig | None, dtype, device):
    """(files with their keys, the model skeleton, a :class:`_Stream` to install its tensors):
    parameters on meta, linear layers swapped for empty ``Linear4bit`` shells where the checkpoint
    is bitsandbytes 4-bit (its own settings) or ``quantization`` asks for it."""
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
        try:
            stored = QuantConfig.from_transformers(raw_qc) if raw_qc else QuantConfig(skip_modules=[])
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        if quantization is not None:
            stored.compute_dtype = quantization.compute_dtype
        for key_prefix in prequantized:
            name = resolve(key_prefix + ".weight").removesuffix(".weight")
            module = _get(model, name, key_prefix + ".weight")
            if not is_quantizable(module):
                raise ValueError(
                    f"{key_prefix}.weight: quantized in the checkpoint but {name} is a {type(module)}"
                )
            lin4[name] = replace_module(model, name, Linear4bit.from_linear(module, stored))
    elif quantization is not None:
        quantize(model, quantization)
        lin4 = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    own = dict(model.state_dict(keep_vars=True))  # names after the swap
    return files, model, _Stream(model, lin4, resolve, all_keys, dtype, device)


class _Stream:
    """Installs a skeleton's checkpoint tensors one at a time, by checkpoint key: plain tensors at
    once; a ``Linear4bit``'s tensors are gathered until all of its keys have arrived (they may sit in
    different shards), then quantized or unpacked. The modules are looked up by the names they had
    when the stream was made, so adapters may wrap them meanwhile (``training/sharded_load.py``)."""

    def __init__(self, model: nn.Module, lin4: dict, resolve, all_keys: list[str], dtype, device) -> None:
        self.model, self.lin4, self.resolve, self.dtype, self.device = model, lin4, resolve, dtype, device
        self.modules = dict(model.named_modules())
        self.expected: dict[str, set] = {}
        for key in all_keys:
            owner = self.owner(key)
            if owner is not None:
                self.expected.setdefault(owner, set()).add(self.resolve(key)[len(owner) + 1 :])
        self.pending: dict[str, dict] = {}
        self.sources: dict[str, list[str]] = {}  # the files a pending 4-bit layer's tensors came from
        self.unexpected: list[str] = []

    def owner(self, key: str) -> str | None:
        """The ``Linear4bit`` (its name) checkpoint ``key`` belongs to, or None."""
        return _owner(self.resolve(key), self.lin4)

    def module_of(self, key: str) -> nn.Module | None:
        """The module checkpoint ``key`` is installed into (None: no such module)."""
        owner = self.owner(key)
        if owner is not None:
            return self.lin4[owner]
        module_name = self.resolve(key).rpartition(".")[0]
        return self._module(module_name)

    def _module(self, name: str) -> nn.Module | None:
        if name in self.modules:
            return self.modules[name]
        try:  # (a module shared under two names is listed once by named_modules)
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def put(self, file: Path, key: str, t: torch.Tensor) -> None:
        name = self.resolve(key)
        owner = _owner(name, self.lin4)
        dtype, device = self.dtype, self.device
        if owner is None:
            module_name, _, attr = name.rpartition(".")
            module = self._module(module_name)
            try:
                if module is None or not _set_tensor(module, attr, t, dtype, device, name):
                    self.unexpected.append(key)
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None
            return
        rel = name[len(owner) + 1 :]
        if rel == "weight" and t.is_floating_point():
            t = t.to(device, dtype) if dtype is not None else t.to(device)
        elif rel == "bias" and dtype is not None:
            t = t.to(dtype)
        self.pending.setdefault(owner, {})[rel] = t
        if str(file) not in self.sources.setdefault(owner, []):
            self.sources[owner].append(str(file))
        if self.pending[owner].keys() == self.expected[owner]:
            try:
                _fill_linear4bit(self.lin4[owner], self.pending.pop(owner), owner, device)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{', '.join(self.sources[owner])}: {e}") from None


def load_model(path, quantization: QuantConfig | dict | None = None, dtype=None, device=None) -> nn.Module:
    """Load a transformers model directory (``config.json`` + safetensors, sharded or not).

    Args:
        path: the directory, a hub id (``org/name``: its cached snapshot, else downloaded), a
            ``.gguf`` file or ``builtin:smollm2-135m-instruct`` (converted once, then cached).
        quantization: a :class:`QuantConfig` (or its kwargs) to quantize every linear layer but
            ``skip_modules`` while streaming. A directory saved in bitsandbytes 4-bit is loaded as
            stored whatever this says (its compute dtype is taken from here when given).
        dtype: cast floating weights to this dtype (quantization then happens from it).
        device: where the model lives (weights are quantized there, e.g. on the GPU).

    Returns the model in eval mode. Raises :class:`ModelNotFoundError` (a ``FileNotFoundError``)
    when there is no such directory or hub model; ``ValueError`` naming the file and tensor/field
    when a file is unreadable or a quantized checkpoint's state is missing or inconsistent;
    ``KeyError`` (also a ``ValueError``) listing weights the checkpoint lacks.
    """
    source, path = str(path), model_dir(path)
    if isinstance(quantization, dict):
        quantization = QuantConfig(**quantization)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    files, model, stream = _skeleton(path, quantization, dtype, device)
    for file, keys in files:
        for key in keys:
            stream.put(file, key, _read_tensor(file, key))
    unexpected = stream.unexpected
    lin4 = stream.lin4
    if unexpected:
        warnings.warn(
            f"load_model: {len(unexpected)} checkpoint tensors unused: {unexpected[:8]}", stacklevel=2
        )

    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, m in lin4.items() if m.quant_state is None]
    if missing:
        raise _MissingWeights(
            f"load_model: {path} lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    model.to(device)  # the buffers built at construction
    if dtype is not None and getattr(model, "config", None) is not None:
        model.config.dtype = dtype  # what save_model writes back, as from_pretrained(dtype=...) does
    name = base_name(source)
    if name is not None and getattr(model, "config", None) is not None:
        model.config._name_or_path = name  # an adapter's base_model_name_or_path: not the cache dir
    return model.eval()


def _get(model: nn.Module, name: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{key}: the model has no module {name!r}") from None


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
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    config = getattr(model, "config", None)
    if config is None:
        return
    d = config.to_dict()
    d.pop("quantization_config", None)
    qc = _quant_config_of(model)
    if qc is not None:
        d["quantization_config"] = qc.to_transformers()
    text = json.dumps(d, indent=2, sort_keys=True) + "\n"
    atomic_write_text(path / "config.json", text)
