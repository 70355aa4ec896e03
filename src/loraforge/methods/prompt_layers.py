"""Prompt learning's modules: the per-adapter encoders, their holder, and the two forward hooks.

The model stays a plain transformers model. ``model.prompt_encoder`` (a :class:`PromptLearningLayer`)
holds one encoder per adapter (parameters ``prompt_encoder.<adapter>.embedding.weight``, ... as
in PEFT) and hooks two forwards (``register_forward_pre_hook(with_kwargs=True)``):

- the body (``model.base_model``, e.g. ``LlamaModel``) gets its inputs rewritten for the active
  adapter: prompt / P-tuning put the virtual token embeddings before ``inputs_embeds``; prefix
  tuning puts its keys and values into the cache (a transformers ``Cache``) before the tokens';
  the 2-D attention mask gets ones and ``position_ids`` move on by ``num_virtual_tokens``;
- the top model (``...ForCausalLM``) gets labels of -100 for the virtual tokens (prompt / P-tuning).

A cache that received virtual tokens is marked with the adapter; a later call with that cache
(``generate``'s decoding steps, a manual loop) is a continuation: only the mask and positions
move on. The same cache under another adapter, or an unmarked non-empty one, is refused.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..layers import AdapterLayer
from .prompt_config import PrefixTuningConfig

MARK = "_lf_prompt_adapter"  # attribute put on a transformers Cache: which adapter's tokens it holds
IGNORE = -100


class PrefixEncoder(nn.Module):
    """``forward() -> T`` (num_virtual_tokens × 2·L·D): the key/value table (see PrefixTuningConfig)."""

    def __init__(self, cfg: PrefixTuningConfig) -> None:
        super().__init__()
        n, width = cfg.table_shape()
        if cfg.prefix_projection and not cfg.inference_mode:
            self.embedding = nn.Embedding(n, cfg.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(cfg.token_dim, cfg.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(cfg.encoder_hidden_size, width),
            )
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "transform")

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        return self.transform(e) if self.reparameterized else e


class PromptEmbedding(nn.Module):
    """``forward() -> P`` (num_virtual_tokens × hidden): prompt tuning's virtual token embeddings."""

    reparameterized = False

    def __init__(self, cfg, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*cfg.table_shape())
        if init is not None:
            self.embedding.weight = nn.Parameter(init.detach().to(torch.float32).clone())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PTuningEncoder(nn.Module):
    """``forward() -> P`` (num_virtual_tokens × hidden): P-tuning's MLP or biLSTM + MLP encoder."""

    def __init__(self, cfg) -> None:
        super().__init__()
        n, d = cfg.table_shape()
        h = cfg.encoder_hidden_size
        self.kind = cfg.encoder_reparameterization_type
        self.embedding = nn.Embedding(n, d)
        if cfg.inference_mode:
            return
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(
                d,
                h,
                num_layers=cfg.encoder_num_layers,
                dropout=cfg.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:  # (PEFT: always two hidden layers; encoder_num_layers is ignored for the MLP)
            self.mlp_head = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
            )

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "mlp_head")

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        if not self.reparameterized:
            return e
        if self.kind == "LSTM":
            return self.mlp_head(self.lstm_head(e[None])[0])[0]
        return self.mlp_head(e)


def _kind(cfg) -> str:
    return "prefix" if isinstance(cfg, PrefixTuningConfig) else "prompt"


_SIGNATURES: dict[type, list[str]] = {}


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments as keywords (GPT-2's head passes input_ids positionally)."""
    if not args:
        return dict(kwargs)
    names = _SIGNATURES.get(type(module))
    if names is None:
        names = _SIGNATURES[type(module)] = list(inspect.signature(module.forward).parameters)
    out = dict(kwargs)
    for name, value in zip(names, args):
        out[name] = value
    return out


def cache_key(module: nn.Module) -> str:
    """The forward's cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise ValueError(
            "prompt adapters need the cache as a transformers Cache (e.g. DynamicCache), "
            f"got {type(cache).__name__}"
        )
    return int(cache.get_seq_length())


class PromptLearningLayer(AdapterLayer, nn.ModuleDict):
    """Holds each prompt adapter's encoder under its name (``model.prompt_encoder.<adapter>``) and
    the resolved config (``specs``); wraps no module (``base_layer`` is None)."""

    adapter_param_names = ("encoders",)
    method = "prompt learning"
    cannot_merge = "virtual tokens and key/value prefixes are extra inputs, not a change to any weight"

    def __init__(self) -> None:
        AdapterLayer.__init__(self, None)
        self.specs: dict[str, object] = {}

    @property
    def encoders(self) -> nn.Module:
        return self  # (the holder is the ModuleDict of encoders: PEFT's parameter names)

    @property
    def adapters(self) -> list[str]:
        return list(self._modules)

    def add(self, adapter: str, cfg, encoder: nn.Module) -> None:
        self._modules[adapter] = encoder  # (not add_module: an adapter may be named like a method)
        self.specs[adapter] = cfg

    def delete(self, name: str) -> None:
        super().delete(name)
        self.specs.pop(name, None)

    def file_table(self, adapter: str) -> torch.Tensor:
        """What the file stores as ``prompt_embeddings``: the table itself (a live parameter) or,
        for a reparameterised adapter, the encoder's output, computed in eval mode (no dropout)."""
        encoder = self._modules[adapter]
        if not encoder.reparameterized:
            return encoder.embedding.weight
        mode = encoder.training
        try:
            with torch.no_grad():
                return encoder.eval()()
        finally:
            encoder.train(mode)

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._top_hook, with_kwargs=True)
        model.base_model.register_forward_pre_hook(self._body_hook, with_kwargs=True)

    def unwrap(self, model: nn.Module, path: str) -> None:
        """Take the hooks off and the holder out of the model (no adapter is left)."""
        for module in (model, model.base_model):
            # found by owner rather than by a stored handle, which a deepcopy of the model would not follow
            for key, fn in list(module._forward_pre_hooks.items()):
                if getattr(fn, "__self__", None) is self:
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
        parent, _, child = path.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, child)

    def plan(self):
        """(kind, num_virtual_tokens, key) for this forward, or None when no prompt adapter applies;
        ``key`` is the adapter name, or with ``batch_adapters`` the tuple of row names."""
        if self.disabled:
            return None
        rows = self.batch_adapters
        if rows is not None:
            mine = [r if r in self.specs else None for r in rows]
            if all(m is None for m in mine):
                return None
            if any(m is None for m in mine):
                other = sorted({r for r, m in zip(rows, mine) if m is None})
                raise ValueError(
                    f"adapter_batch: rows {other} have no prompt adapter and cannot share a batch with "
                    f"rows of prompt adapters {sorted({m for m in mine if m})} (virtual tokens change "
                    "every row's length)"
                )
            shapes = {
                n: (_kind(self.specs[n]), self.specs[n].num_virtual_tokens) for n in dict.fromkeys(mine)
            }
            if len(set(shapes.values())) > 1:
                raise ValueError(
                    "adapter_batch: prompt adapters of one batch must be of one kind with one "
                    "num_virtual_tokens; "
                    f"got {', '.join(f'{n}: {k} of {p}' for n, (k, p) in shapes.items())}"
                )
            kind, n = next(iter(shapes.values()))
            return kind, n, tuple(mine)
        live = self.live_adapters()
        if not live:
            return None
        if len(live) > 1:
            raise ValueError(
                f"prompt adapters {live} are active at once; a model takes one prompt adapter at a time "
                "(lf.set_adapter(model, name))"
            )
        return _kind(self.specs[live[0]]), self.specs[live[0]].num_virtual_tokens, live[0]

    def _tables(self, key, batch: int, device) -> torch.Tensor:
        """(batch, num_virtual_tokens, width): the adapter's table per row."""
        if isinstance(key, str):
            t = self._modules[key]().to(device)
            return t.unsqueeze(0).expand(batch, *t.shape)
        tables = {n: self._modules[n]().to(device) for n in dict.fromkeys(key)}
        return torch.stack([tables[n] for n in key])

    def _top_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Labels of -100 for the virtual tokens that prompt / P-tuning put first (PEFT's)."""
        plan = self.plan()
        if plan is None or plan[0] == "prefix":
            return None
        kwargs = _bind(module, args, kwargs)
        labels = kwargs.get("labels")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if labels is None or _cache_length(cache):  # (a continuation: the labels cover new tokens only)
            return None
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], plan[1]), IGNORE), labels], dim=1)
        return (), kwargs

    def _body_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        kwargs = _bind(module, args, kwargs)
        key = cache_key(module)
        if key == "cache" and "past_key_values" in kwargs and kwargs.get("cache") is None:
            kwargs["cache"] = kwargs.pop("past_key_values")  # (the deprecated name)
        cache = kwargs.get(key)
        past = _cache_length(cache)
        mark = getattr(cache, MARK, None) if past else None
        plan = self.plan()
        if plan is None:
            if mark is not None:
                raise ValueError(
                    f"the cache holds the virtual tokens of prompt adapter {mark!r}, which is not active "
                    "now; start from an empty cache"
                )
            return (), kwargs
        kind, n, name = plan
        if past and mark != name:
            if mark is None:
                raise ValueError(
                    f"the cache holds {past} tokens computed without prompt adapter {name!r}; "
                    "start from an empty cache (the virtual tokens go first)"
                )
            raise ValueError(
                f"the cache holds the virtual tokens of prompt adapter {mark!r}, not of {name!r}"
            )
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return (), kwargs  # (the model says what is missing)
        batch, length = x.shape[:2]
        if kwargs.get("token_type_ids") is not None:
            raise ValueError("token_type_ids are not supported with prompt adapters (PEFT drops them)")
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError(
                "prompt adapters need a 2-D attention_mask (batch × tokens) or none; got "
                f"{type(mask).__name__}{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''} "
                "(a static / compiled cache builds a 4-D one: use the default dynamic cache)"
            )
        self._check_context(module, name, n, past - n if past else 0, length, pos)
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if pos is not None:  # real tokens take positions from n on (PEFT's rule for prefix tuning)
            pos = pos + n
            if kind == "prompt" and not past:  # (and the virtual tokens 0 .. n-1, before them)
                ahead = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
                pos = torch.cat([ahead, pos], dim=-1)
            kwargs["position_ids"] = pos
        if past:  # a continuation: the cache already holds the virtual tokens
            return (), kwargs
        tables = self._tables(name, batch, x.device)
        if kind == "prefix":
            kwargs[key] = self._fill_prefix(module, cache, tables, name)
            return (), kwargs
        if embeds is None:
            embeds = module.get_input_embeddings()(ids)
        kwargs["inputs_embeds"] = torch.cat([tables.to(embeds.dtype), embeds], dim=1)
        kwargs["input_ids"] = None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        if cache is None and use_cache:  # (made here so that it carries the mark)
            from transformers import DynamicCache

            cache = kwargs[key] = DynamicCache(config=module.config)
        if cache is not None:
            setattr(cache, MARK, name)
        return (), kwargs

    def _fill_prefix(self, module: nn.Module, cache, tables: torch.Tensor, name):
        """Each layer's keys and values of the virtual tokens into ``cache`` (a new DynamicCache
        when None): the table row (2·L·D) splits as [K_0, V_0, K_1, V_1, ...], each D = heads ×
        head_dim (PEFT's layout)."""
        if module.training and torch.is_grad_enabled():
            if any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
                raise ValueError(
                    "prefix tuning does not work with gradient checkpointing (the cache is not re-run); "
                    "turn it off (as PEFT requires)"
                )
        spec = self.specs[name if isinstance(name, str) else name[0]]
        layers, heads = spec.num_layers, spec.num_attention_heads
        batch, n, _ = tables.shape
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), tables.dtype)
        kv = (
            tables.to(dtype)
            .reshape(batch, n, 2 * layers, heads, spec.token_dim // heads)
            .permute(2, 0, 3, 1, 4)
        )
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=module.config)
        for layer in range(layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        setattr(cache, MARK, name)
        return cache

    def _check_context(self, module, name, n: int, seen: int, length: int, pos) -> None:
        """The virtual tokens count against the context window: refuse past max_position_embeddings."""
        limit = getattr(module.config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return
        last = (int(pos.max()) if pos is not None and pos.numel() else seen + length - 1) + n
        if last >= limit:
            label = name if isinstance(name, str) else sorted(set(name))
            raise ValueError(
                f"prompt adapter {label!r}: its {n} virtual tokens and {seen + length} tokens of input need "
                f"{last + 1} positions, more than the model's max_position_embeddings ({limit}); "
                "shorten the input or max_new_tokens"
            )
