"""Train only some rows of an embedding (``LoraConfig.trainable_token_indices``; PEFT's
TrainableTokens), e.g. the embeddings of new chat-template tokens, beside LoRA on other modules.

For token ids I = (i_1 … i_k) of an embedding table W (num × dim) an adapter holds

    trainable_tokens_delta   D (k × dim), trained, initialised to W[I]
    trainable_tokens_original  W[I] as it was (a non-persistent buffer, never saved)

and the adapted layer looks its input up in W' = W with rows I replaced by D (``index_copy``):
the rows are *replaced*, not summed, so D is the rows' value itself (PEFT's choice: a table
resized and re-initialised between runs still gives the trained rows). All other rows stay
frozen. Merging writes D into W's rows; unmerging writes back the rows as they were before the
merge, bit for bit. Adapters whose token ids overlap cannot be active or merged together.

Which layers (PEFT's rule): a list of ids targets the input embedding (``get_input_embeddings()``,
else a module named ``embed_tokens``); ``{name: ids}`` targets the named modules (a name matches a
path equal to it or ending in ``"." + name``). Where the output layer shares the input embedding's
weight (tied embeddings, and ``config.tie_word_embeddings`` is not false), it is wrapped too,
tied to the embedding's adapter: it uses the same D (no copy, nothing more in the file), so the
trained rows also score those tokens. A dict that names both tied layers with the same ids is the
same thing; with different ids each gets its own D, as in PEFT.

The file holds one tensor per (untied) layer, ``<path>.token_adapter.trainable_tokens_delta``
(k × dim), PEFT's key; the live parameter is ``<path>.token_adapter.trainable_tokens_delta.<adapter>``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..kinds import replace_module
from .base import LoraLayer, lora_dtype
from .modules_to_save import ModulesToSave
from .tokens import tokens_first


class TrainableTokens(LoraLayer):
    """Selected rows of an ``nn.Embedding`` (or of an output ``nn.Linear`` tied to one) trained,
    one set of rows per adapter (see the module docstring). ``tied_to``: the input embedding's
    layer whose rows this one shares (the tied output layer)."""

    adapter_param_names = ("token_adapter.trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokens | None = None) -> None:
        super().__init__(base_layer)
        self._tied = [tied_to] if tied_to is not None else []  # (a list: not a submodule)
        if tied_to is None:
            self.token_adapter = nn.Module()  # PEFT's names: token_adapter.trainable_tokens_*
            self.token_adapter.trainable_tokens_delta = nn.ParameterDict()
            self.token_adapter.trainable_tokens_original = nn.Module()  # non-persistent buffers
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.adapter_param_names = ()  # the rows are the embedding's: saved and trained there

    def __getattr__(self, name: str):
        if "." in name:  # ("token_adapter.trainable_tokens_delta", as adapter_param_names says)
            obj = self
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        return super().__getattr__(name)

    @property
    def source(self) -> TrainableTokens:
        """The layer that holds the rows (this one, or the embedding this one is tied to)."""
        return self._tied[0] if self._tied else self

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids (k,), trained rows D (k × dim)) of adapter ``name``."""
        src = self.source
        delta = src.token_adapter.trainable_tokens_delta[name]
        return torch.tensor(src.token_indices[name], device=delta.device), delta

    # -- adapters ----------------------------------------------------------------------------
    def add_tokens(self, name: str, indices: list[int]) -> None:
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.r[name], self.alpha[name], self.scaling[name] = len(indices), 1.0, 1.0
        self.lora_dropout[name] = nn.Identity()
        if not self._tied:
            w = self.base_layer.weight
            original = w.detach()[torch.tensor(indices, device=w.device)].clone()
            self.token_indices[name] = list(indices)
            self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(original.to(lora_dtype(w)))
            self.token_adapter.trainable_tokens_original.register_buffer(name, original, persistent=False)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete(self, name: str) -> None:
        super().delete(name)
        if not self._tied:
            self.token_indices.pop(name, None)
            delattr(self.token_adapter.trainable_tokens_original, name)

    def params_of(self, name: str) -> list[nn.Parameter]:
        return [self.rows(name)[1]]

    def factors(self, name: str):
        raise TypeError("trainable tokens have no low-rank factors (they cannot be combined or reshaped)")

    # -- weights -----------------------------------------------------------------------------
    def _check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for n in dict.fromkeys(names):
            ids = set(self.source.token_indices[n])
            if seen & ids:
                raise ValueError(
                    f"trainable tokens of adapter {n!r} overlap another active or merged adapter's "
                    f"({sorted(seen & ids)[:5]}): only adapters with disjoint token ids can be used together"
                )
            seen |= ids

    def adapted_weight(self, names: list[str], weight: torch.Tensor | None = None) -> torch.Tensor:
        """W with each adapter's rows replaced by its D (differentiable in D)."""
        w = self.base_layer.weight if weight is None else weight
        for n in names:
            idx, delta = self.rows(n)
            w = w.index_copy(0, idx.to(w.device), delta.to(w))
        return w

    def _run(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        """The layer on the adapted table W'. A plain ``nn.Embedding`` (no max_norm, no padding
        row among the ids) looks up W and puts D's rows at the chosen ids; a plain ``nn.Linear``
        (the tied head) computes all scores with W and the chosen ones with D: no (num × dim) copy
        of W per step, the same values. Anything else (a subclass that scales, max_norm, ...)
        runs its own forward on W' (PEFT's way)."""
        base = self.base_layer
        if not args and not kwargs and type(base) is nn.Linear:
            out = base(x)
            for n in names:
                idx, delta = self.rows(n)
                bias = None if base.bias is None else base.bias[idx]
                out = out.index_copy(-1, idx, F.linear(x, delta.to(x.dtype), bias).to(out.dtype))
            return out
        plain = type(base) is nn.Embedding and base.max_norm is None and not args and not kwargs
        if plain and not any(base.padding_idx in self.source.token_indices[n] for n in names):
            out = base(x)
            for n in names:
                idx, delta = self.rows(n)
                where = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
                where[idx.to(x.device)] = torch.arange(len(idx), device=x.device)
                pos = where[x]
                rows = F.embedding(pos.clamp(min=0), delta).to(out.dtype)
                out = torch.where((pos >= 0).unsqueeze(-1), rows, out)
            return out
        weight = self.adapted_weight(names)
        return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None or self._per_token():
            if self.merged_adapters:
                raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call lf.unmerge(model)")
            return self._forward_rows(x, *args, **kwargs)
        self.check_merged_training()
        live = self.live_adapters()
        if not live:
            return self.base_layer(x, *args, **kwargs)
        self._check_disjoint(self.merged_adapters + live)
        return self._run(x, live, *args, **kwargs)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One adapter per batch row (``batch_adapters``) or per token (a serving ``token_plan``):
        the base everywhere, then each group's positions from its own table."""
        result = self.base_layer(x, *args, **kwargs).clone()
        if self.batch_adapters is not None:
            names = self.batch_adapters
            if len(names) != x.shape[0]:
                raise ValueError(f"adapter_batch got {len(names)} names for a batch of {x.shape[0]} rows")
            for n in sorted({n for n in names if n in self.r}):
                rows = torch.tensor([i for i, m in enumerate(names) if m == n], device=x.device)
                result[rows] = self._run(x[rows], [n], *args, **kwargs).to(result.dtype)
            return result
        plan = self.token_plan
        groups = plan.groups(self.r, x.device)
        if groups is None:
            return result
        xt, out = tokens_first(x, plan.num_tokens), tokens_first(result, plan.num_tokens)
        for n, rows in groups.rows.items():
            out.index_copy_(0, rows, self._run(xt.index_select(0, rows), [n], *args, **kwargs).to(out.dtype))
        return result

    # -- merge -------------------------------------------------------------------------------
    def merge(self, name: str | list[str]) -> None:
        """Write the adapters' rows into the base table (idempotent; the rows before are kept)."""
        names = [name] if isinstance(name, str) else list(name)
        for n in names:
            if n not in self.r:
                raise KeyError(n)
        new = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not new:
            return
        self._check_disjoint(self.merged_adapters + new)
        record = self.__dict__.setdefault("_merge_record", [])
        w = self.base_layer.weight
        with torch.no_grad():
            for n in new:
                idx, delta = self.rows(n)
                idx = idx.to(w.device)
                if self._tied:  # (the embedding's layer writes the shared table)
                    record.append((n, idx, None, delta.detach().clone()))
                    continue
                record.append((n, idx, w[idx].clone(), delta.detach().clone()))
                w.index_copy_(0, idx, delta.to(w))
        self.merged_adapters += new

    def nonfinite_merge(self, name: str | list[str]) -> str | None:
        """ "embedding rows" where merging would write NaN/Inf into the table, else None."""
        names = [name] if isinstance(name, str) else list(name)
        for n in names:
            w = self.base_layer.weight
            if n not in self.merged_adapters and not bool(
                torch.isfinite(self.rows(n)[1].detach().to(w)).all()
            ):
                return "embedding rows"
        return None

    def unmerge(self, name: str | None = None) -> list[str]:
        """Put back the rows as they were before the merge, bit for bit; returns the adapters
        whose rows changed while merged."""
        if name is not None and name not in self.merged_adapters:
            return []
        record = self.__dict__.get("_merge_record", [])
        keep = [] if name is None else [n for n in self.merged_adapters if n != name]
        changed = []
        w = self.base_layer.weight
        with torch.no_grad():
            for n, idx, before, merged in reversed(record):
                if before is not None:
                    w.index_copy_(0, idx, before)
                if n in self.r and not torch.equal(self.rows(n)[1].detach(), merged):
                    changed.append(n)
        self.__dict__.pop("_merge_record", None)
        self.merged_adapters = []
        if keep:
            self.merge(keep)
        return [n for n in changed if n not in keep]

    def extra_repr(self) -> str:
        tied = ", tied to the input embedding" if self._tied else ""
        return super().extra_repr() + tied


# -- finding and wrapping the layers -------------------------------------------------------------


@dataclasses.dataclass
class TokenTarget:
    path: str
    indices: list[int]
    tied_to: str | None = None  # the path of the layer whose rows it shares


def _input_embedding_path(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    for name, module in model.named_modules():
        if emb is not None and (module is emb or getattr(module, "base_layer", None) is emb):
            return name
    return next(
        (n for n, _ in model.named_modules() if n == "embed_tokens" or n.endswith(".embed_tokens")), None
    )


def _resolve(model: nn.Module, key: str) -> str:
    hits = [n for n, m in model.named_modules() if n == key or n.endswith("." + key)]
    hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]  # (not a wrapper's inner)
    if not hits:
        raise ValueError(f"trainable_token_indices: {key!r} matches no module of {type(model).__name__}")
    if len(hits) > 1:
        raise ValueError(f"trainable_token_indices: {key!r} matches several modules: {hits[:3]}")
    return hits[0]


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokens) else module


def plan_tokens(model: nn.Module, cfg, module_targets: list[str], adapter: str) -> list[TokenTarget]:
    """Where ``cfg.trainable_token_indices`` puts trainable rows, checked before the model changes."""
    spec = cfg.trainable_token_indices
    if isinstance(spec, dict):
        wanted = {_resolve(model, k): list(v) for k, v in spec.items()}
    else:
        path = _input_embedding_path(model)
        if path is None:
            raise ValueError(
                "trainable_token_indices: the model has no input embedding (name the module in a dict)"
            )
        wanted = {path: list(spec)}
    emb_path = _input_embedding_path(model)
    plan = []
    for path, ids in wanted.items():
        module = model.get_submodule(path)
        base = _base(module)
        if isinstance(module, (LoraLayer, ModulesToSave)) and not isinstance(module, TrainableTokens):
            raise ValueError(f"trainable_token_indices: {path!r} is also adapted by LoRA or modules_to_save")
        if path in module_targets or (
            cfg.modules_to_save and any(path == m or path.endswith("." + m) for m in cfg.modules_to_save)
        ):
            raise ValueError(
                f"trainable_token_indices: {path!r} is also in target_modules / modules_to_save; "
                "train some of its rows or adapt the whole layer, not both"
            )
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ValueError(
                f"trainable_token_indices: {path!r} is a {type(base).__name__}, not an embedding"
            )
        num = base.weight.shape[0]
        if max(ids) >= num:
            raise ValueError(
                f"trainable_token_indices: token id {max(ids)} is out of range for {path!r} ({num} rows)"
            )
        if isinstance(module, TrainableTokens) and adapter in module.r:
            raise ValueError(f"adapter {adapter!r} already has trainable tokens on {path!r}")
        plan.append(TokenTarget(path, ids))
    # Output layers that share the input embedding's weight follow its rows (PEFT's tying).
    source = next((t for t in plan if t.path == emb_path), None)
    if (
        source is not None
        and getattr(getattr(model, "config", None), "tie_word_embeddings", None) is not False
    ):
        weight = _base(model.get_submodule(emb_path)).weight
        inside = None
        for name, module in model.named_modules():
            if inside is not None and name.startswith(inside):
                continue  # (a wrapper's own parts)
            inside = name + "." if isinstance(module, (LoraLayer, ModulesToSave)) else None
            if name == emb_path or not name or not isinstance(module, (TrainableTokens, nn.Linear)):
                continue
            if _base(module).weight is weight:
                own = next((t for t in plan if t.path == name), None)
                if own is None or own.indices == source.indices:
                    if own is not None:
                        plan.remove(own)
                    plan.append(TokenTarget(name, source.indices, tied_to=emb_path))
    return plan


def expected_shapes(model: nn.Module, plan: list[TokenTarget], prefix: str) -> dict[str, tuple]:
    """File key -> shape of each (untied) planned layer's rows."""
    out = {}
    for t in plan:
        if t.tied_to is None:
            dim = _base(model.get_submodule(t.path)).weight.shape[1]
            out[f"{prefix}{t.path}.token_adapter.trainable_tokens_delta"] = (len(t.indices), dim)
    return out


def inject_tokens(model: nn.Module, adapter: str, plan: list[TokenTarget]) -> None:
    """Wrap (or join the wrapper of) each planned layer and add ``adapter``'s rows to it."""
    for t in sorted(plan, key=lambda t: t.tied_to is not None):  # (sources before the tied layers)
        module = model.get_submodule(t.path)
        if not isinstance(module, TrainableTokens):
            tied = model.get_submodule(t.tied_to) if t.tied_to else None
            module = replace_module(model, t.path, TrainableTokens(module, tied).train(module.training))
        module.add_tokens(adapter, t.indices)


__all__ = ["TokenTarget", "TrainableTokens", "expected_shapes", "inject_tokens", "plan_tokens"]
