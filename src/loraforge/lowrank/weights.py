"""A model checkpoint read one tensor at a time, by parameter name, for ``extract``.

:class:`Checkpoint` builds the model's module tree on the meta device (``model_files``' skeleton:
no weights, 4-bit layers as empty ``Linear4bit`` shells) to know which parameter is a linear
weight, then reads a tensor only when asked, through a safetensors handle opened for that tensor
alone (``model_files._read_tensor``: a long-lived handle would keep the whole memory-mapped file
resident). Peak memory is the tensor asked for, not the model.

Every weight comes back in one layout: a linear layer's as (out, in), GPT-2's ``Conv1D``
(stored (in, out)) transposed, a bitsandbytes 4-bit layer's dequantized from its packed bytes and
quant state. The same :class:`Checkpoint` reads fp32, bf16 and 4-bit directories alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..kinds import is_conv1d
from ..model_files import _read_tensor, _skeleton, model_dir
from ..quant import Linear4bit


def is_linear(module: nn.Module) -> bool:
    """A layer whose weight is a plain (out, in) map: Linear, GPT-2 Conv1D, 4-bit Linear."""
    return isinstance(module, (nn.Linear, Linear4bit)) or is_conv1d(module)


class Checkpoint:
    """The tensors of model ``source`` (a directory, hub id, ``builtin:NAME`` or ``.gguf``).

    ``model`` is the meta-device skeleton; ``modules`` its named modules; ``head`` the name of the
    output head (``lm_head``) or ``None``; ``params`` the parameter names (tied ones once) with
    their logical shapes (linear weights as (out, in)).
    """

    def __init__(self, source) -> None:
        self.source = str(source)
        self.path: Path = model_dir(source)
        files, self.model, stream = _skeleton(self.path, None, None, torch.device("cpu"))
        self._lin4: dict[str, Linear4bit] = stream.lin4
        self._expected = stream.expected  # 4-bit layer -> its tensor names (weight, weight.absmax, ...)
        # parameter name (as the model calls it) -> (file, key in the file)
        self._where = {stream.resolve(k): (file, k) for file, keys in files for k in keys}
        self.modules = dict(self.model.named_modules())
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        self.head = next((n for n, m in self.modules.items() if head is not None and m is head), None)
        get_embed = getattr(self.model, "get_input_embeddings", None)
        embed = get_embed() if callable(get_embed) else None
        self.embedding = next((n for n, m in self.modules.items() if embed is not None and m is embed), None)
        self.params: dict[str, tuple[int, ...]] = {}
        for name, p in self.model.named_parameters():
            module_name, _, attr = name.rpartition(".")
            self.params[name] = self._shape(self.modules[module_name], attr, p)

    @property
    def arch(self) -> str:
        return type(self.model).__name__

    def _shape(self, module: nn.Module, attr: str, p: torch.Tensor) -> tuple[int, ...]:
        if attr == "weight" and isinstance(module, Linear4bit):
            return (module.out_features, module.in_features)
        if attr == "weight" and is_conv1d(module):
            return tuple(p.shape[::-1])
        return tuple(p.shape)

    def linear_layers(self) -> list[str]:
        """Names of the linear layers (Linear, Conv1D, 4-bit), the output head excluded."""
        return [n for n, m in self.modules.items() if n and n != self.head and is_linear(m)]

    def has(self, name: str) -> bool:
        """Whether the files hold parameter ``name`` (a tied head's weight is not stored)."""
        module_name = name.rpartition(".")[0]
        return name in self._where or (module_name in self._lin4 and name.endswith(".weight"))

    def tied(self, name: str) -> bool:
        """Parameter ``name`` is the output head's weight, tied to the input embeddings."""
        config = getattr(self.model, "config", None)
        return name == f"{self.head}.weight" and bool(getattr(config, "tie_word_embeddings", False))

    def read(self, name: str) -> torch.Tensor:
        """Parameter ``name`` from the files, in its logical layout (linear weights (out, in));
        floating, in the checkpoint's dtype (a 4-bit weight: float32); a tied head's weight is the
        input embeddings'. Raises ``ValueError``
        naming the directory and tensor when the files lack it."""
        if name not in self._where and self.tied(name) and self.embedding:
            name = f"{self.embedding}.weight"  # (a tied head is stored as the input embeddings)
        module_name, _, attr = name.rpartition(".")
        module = self.modules.get(module_name)
        if attr == "weight" and module_name in self._lin4:
            return self._dequantize(module_name)
        if name not in self._where:
            raise ValueError(f"{self.path}: no tensor {name} in its safetensors files")
        t = _read_tensor(*self._where[name])
        if attr == "weight" and is_conv1d(module):
            t = t.T
        if not t.is_floating_point():
            raise ValueError(f"{self._where[name][0]}: tensor {name} is {t.dtype}, not floating point")
        return t

    def _dequantize(self, name: str) -> torch.Tensor:
        """A bitsandbytes 4-bit layer's weight as float32 (out, in): its packed bytes and quant
        state loaded into a fresh shell (the skeleton's stays empty), then dequantized."""
        shell = self._lin4[name]
        rels = sorted(r for r in self._expected.get(name, ()) if r == "weight" or r.startswith("weight."))
        if "weight" not in rels:
            raise ValueError(f"{self.path}: no tensor {name}.weight in its safetensors files")
        tensors = {rel: _read_tensor(*self._where[f"{name}.{rel}"]) for rel in rels}
        tmp = Linear4bit(shell.in_features, shell.out_features, bias=False, device="meta")
        tmp.from_conv1d = shell.from_conv1d
        tmp.load_tensors_(tensors, name=f"{self._where[f'{name}.weight'][0]}: {name}.weight")
        return tmp.dequantize(torch.float32)
