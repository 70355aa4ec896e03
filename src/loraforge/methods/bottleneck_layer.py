"""The bottleneck-adapter holder: a small MLP added to a transformer sub-block's output.

Per adapter, on hidden states v (…, d): A(v) = dropout(s · up(f(down(v)))), down: d -> d/r and
up: d/r -> d (with biases), f a nonlinearity, s a constant scale. The output h of a block's
attention or feed-forward module (before the block adds its residual r) becomes

    houlsby  (attention and feed-forward):  h + A(h)                (Houlsby et al. 2019)
    pfeiffer (feed-forward only):           h + A(r + h)            (Pfeiffer et al. 2020)
    parallel (beside the feed-forward):     h + A(r)                (He et al. 2021)

so the block's output is r + h + A(…); for Pfeiffer's that is y + A(y) with y = r + h the block's
usual output. These are AdapterHub's ``double_seq_bn`` / ``seq_bn`` / ``par_bn`` on Llama and GPT-2
(pinned in tests/methods/test_bottleneck.py).

As in AdapterHub, the holders are children of the block (``attention_adapters`` for the
attention module, ``output_adapters`` for the feed-forward one) and nothing is replaced: a forward
hook on the module adds the adapter to its output, so LoRA or (IA)³ layers inside it keep their
paths. The residual stream r, which the feed-forward module does not see (it gets norm(r)), is
taken from the input of the norm before it by a forward pre-hook.

Parameter paths are AdapterHub's within an adapter: ``adapter_down.0`` (the down projection, the
nonlinearity at ``adapter_down.1``) and ``adapter_up``. The nonlinearity makes the adapter no
linear change of the base weights: it cannot be merged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AdapterLayer
from ..layers.base import BASE

# name -> function; AdapterHub resolves these names with transformers' ACT2FN.
NONLINEARITIES = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
}
INITS = ("mam_adapter", "bert", "houlsby")
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


class Activation(nn.Module):
    """A named nonlinearity (no parameters), so that ``adapter_down`` is (Linear, Activation)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NONLINEARITIES[self.name](x)

    def extra_repr(self) -> str:
        return self.name


class _Hook:
    """A forward hook calling the holder on the hooked module's output (``kind`` "output"), or a
    forward pre-hook keeping the input of the norm before the feed-forward, the residual stream r,
    for the holder's next call (``kind`` "stream"). A plain callable: deepcopy follows the model."""

    def __init__(self, holder: BottleneckLayer, kind: str) -> None:
        self.holder, self.kind = holder, kind

    def __call__(self, module: nn.Module, args: tuple, output=None):
        if self.kind == "stream":
            if args and isinstance(args[0], torch.Tensor):
                self.holder.__dict__["_stream"] = args[0]
            return None
        return self.holder(output)


class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on one attention or feed-forward module's output (see the module
    docstring); a child of the block, hooked onto ``module`` (``attach``), wrapping nothing."""

    adapter_param_names = ("adapter_down", "adapter_up")
    method = "bottleneck"
    cannot_merge = "a nonlinearity sits between its two projections: it is no linear change of a weight"

    def __init__(self) -> None:
        super().__init__(None)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.placement: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_down)

    @staticmethod
    def shapes(hidden: int, reduction_factor: float) -> dict[str, tuple[int, ...]]:
        """Parameter shapes by their path in the holder without the adapter name."""
        d = max(1, int(hidden // reduction_factor))  # (AdapterHub's size rule)
        return {
            "adapter_down.0.weight": (d, hidden),
            "adapter_down.0.bias": (d,),
            "adapter_up.weight": (hidden, d),
            "adapter_up.bias": (hidden,),
        }

    def add(self, name: str, cfg, hidden: int, norm: nn.Module | None, dtype: torch.dtype, device) -> None:
        if name in self.adapter_down:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if cfg.placement != "houlsby":
            if norm is None:
                raise ValueError(f"a {cfg.placement} adapter needs the norm before the feed-forward")
            self._hook(norm, "stream")
        d = self.shapes(hidden, cfg.reduction_factor)["adapter_up.weight"][1]
        kw = {"dtype": dtype, "device": device}
        down, up = nn.Linear(hidden, d, **kw), nn.Linear(d, hidden, **kw)
        _init(down, up, cfg.init_weights)
        self.adapter_down[name] = nn.Sequential(down, Activation(cfg.non_linearity))
        self.adapter_up[name] = up
        self.adapter_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        for module in (self.adapter_down[name], up, self.adapter_dropout[name]):
            module.train(self.training)
        self.placement[name], self.scaling[name] = cfg.placement, cfg.scaling
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.adapter_dropout:
            del self.adapter_dropout[name]
        self.placement.pop(name, None)
        self.scaling.pop(name, None)

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, module: nn.Module) -> None:
        """Add the adapters to ``module``'s output from now on."""
        self._hook(module, "output")

    def _hook(self, module: nn.Module, kind: str) -> None:
        hooked = self.__dict__.setdefault("_hooked", [])  # (plain references: not submodules)
        if any(m is module and k == kind for m, k in hooked):
            return
        if kind == "stream":
            module.register_forward_pre_hook(_Hook(self, kind))
        else:
            module.register_forward_hook(_Hook(self, kind))
        hooked.append((module, kind))

    def detach(self) -> None:
        """Remove this holder's hooks."""
        for module, _ in self.__dict__.pop("_hooked", []):
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key, hook in list(hooks.items()):
                    if isinstance(hook, _Hook) and hook.holder is self:
                        del hooks[key]

    def unwrap(self, model: nn.Module, path: str) -> None:
        """Remove the hooks and the holder itself (no adapter is left here)."""
        self.detach()
        parent, _, child = path.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, child)

    # -- forward -----------------------------------------------------------------------------
    def bottleneck(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """A(v) = dropout(s · up(f(down(v)))), in the adapter's dtype."""
        up = self.adapter_up[name]
        out = up(self.adapter_down[name](v.to(up.weight.dtype))) * self.scaling[name]
        return self.adapter_dropout[name](out)

    def delta(self, name: str, h: torch.Tensor, stream: torch.Tensor | None) -> torch.Tensor:
        """What adapter ``name`` adds to the module's output h (see the module docstring)."""
        placement = self.placement[name]
        if placement == "houlsby":
            v = h
        elif stream is None:
            raise RuntimeError(
                f"the {placement} adapter {name!r} needs the residual stream, which the norm before the "
                "feed-forward records when the block runs; the feed-forward module was called on its own"
            )
        else:
            v = stream + h if placement == "pfeiffer" else stream
        return self.bottleneck(name, v).to(h.dtype)

    def forward(self, out):
        """The hooked module's output ``out`` (a tensor, or a tuple whose first item is the hidden
        states) with the adapters added."""
        stream = self.__dict__.pop("_stream", None)  # (this call's; not kept past it)
        if self.disabled:
            return out
        h = out[0] if isinstance(out, tuple) else out
        if self.batch_adapters is not None:
            h = self._mixed(h, stream, self.batch_adapters)
        else:
            for name in self.live_adapters():  # several: applied in turn (AdapterHub's Stack)
                h = h + self.delta(name, h, stream)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _mixed(self, h: torch.Tensor, stream: torch.Tensor | None, names: list[str]) -> torch.Tensor:
        """Row i gets ``names[i]``'s adapter (none for BASE or an adapter not on this module)."""
        if len(names) != h.shape[0]:
            raise ValueError(f"adapter_batch got {len(names)} names for a batch of {h.shape[0]} rows")
        out = h
        for name in sorted({n for n in names if n != BASE and n in self.adapter_down}):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=h.device)
            part = stream.index_select(0, rows) if stream is not None else None
            delta = self.delta(name, h.index_select(0, rows), part)
            out = out.index_add(0, rows, delta)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", placement={self.placement}"


def _init(down: nn.Linear, up: nn.Linear, how: str) -> None:
    """AdapterHub's initialisations: "mam_adapter" (down as nn.Linear's weights, up zero: the
    adapter starts as the identity), "bert" (weights N(0, 0.02)), "houlsby" (weights N(0, 0.01)
    truncated to ±0.02); biases zero."""
    with torch.no_grad():
        if how == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif how == "bert":
            down.weight.normal_(0.0, 0.02)
            up.weight.normal_(0.0, 0.02)
        else:
            for w in (down.weight, up.weight):
                nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)
