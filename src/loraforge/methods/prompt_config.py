"""Configs of prompt learning: prefix tuning, prompt tuning, P-tuning (PEFT's three classes).

Each config is what PEFT's class of the same name holds, mapped both ways with
``adapter_config.json``. The dimensions PEFT derives from the model (``token_dim``,
``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``, ``encoder_hidden_size``)
may be left None: :meth:`resolved` fills them as PEFT does (for prefix tuning on a model with
grouped-query attention, ``token_dim`` is the key/value width ``head_dim · num_key_value_heads``)
and refuses values given that do not fit the model.

``inference_mode`` (PEFT's name): the adapter holds only its final table, the one the file stores
as ``prompt_embeddings``, without the reparameterising encoder (prefix tuning's MLP, P-tuning's
MLP or LSTM). Every adapter loaded from a file is in this mode, as PEFT loads one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import _METADATA, _is_int, build, check_dict_keys, check_file_keys

_DERIVED = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


@dataclass
class _PromptLearning:
    """The fields every prompt-learning config shares (PEFT's ``PromptLearningConfig``).

    num_virtual_tokens: how many virtual tokens the adapter trains (each takes a position of the
        context window).
    token_dim / num_layers / num_attention_heads / num_transformer_submodules: the model's
        dimensions as PEFT records them; None = taken from the model (a value given must fit it).
    inference_mode: the adapter holds only the final table (``prompt_embeddings``), without its
        reparameterising encoder (as loaded from a file).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None
    inference_mode: bool = False

    peft_type = ""
    method = ""
    # loraforge name -> PEFT's adapter_config.json name (where they differ); a class attribute
    PEFT_NAMES = {}

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not _is_int(self.num_virtual_tokens) or self.num_virtual_tokens <= 0:
            raise ValueError(
                f"{name}.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        for key in _DERIVED:
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name}.{key} must be a positive integer or None, got {value!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"{name}.num_transformer_submodules must be 1 (decoder-only models), "
                f"got {self.num_transformer_submodules!r}"
            )
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"{name}.inference_mode must be true or false, got {self.inference_mode!r}")

    # -- what the model decides -----------------------------------------------------------------
    def model_dims(self, model_config) -> dict[str, int]:
        """token_dim, num_layers, num_attention_heads as PEFT derives them from a transformers config."""
        c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        hidden, heads = getattr(c, "hidden_size", None), getattr(c, "num_attention_heads", None)
        layers = getattr(c, "num_hidden_layers", None)
        if not all(_is_int(v) for v in (hidden, heads, layers)):
            raise ValueError(
                f"{type(self).__name__}: the model config lacks hidden_size / num_attention_heads / "
                "num_hidden_layers"
            )
        return {"token_dim": hidden, "num_layers": layers, "num_attention_heads": heads}

    def resolved(self, model_config):
        """A copy with every model-derived field filled; ValueError naming a field given that the
        model contradicts."""
        dims = {**self.model_dims(model_config), "num_transformer_submodules": 1}
        for key, value in dims.items():
            mine = getattr(self, key)
            if mine is not None and mine != value:
                raise ValueError(
                    f"{type(self).__name__}.{key} is {mine} but the model has {value} "
                    "(was this adapter made for another base model?)"
                )
        return dataclasses.replace(self, **dims)

    def table_shape(self) -> tuple[int, int]:
        """(num_virtual_tokens, width) of ``prompt_embeddings`` (on a resolved config)."""
        return (self.num_virtual_tokens, self.token_dim)

    # -- dict / PEFT mapping --------------------------------------------------------------------
    @classmethod
    def _fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None):
        """Build from a plain dict (YAML / kwargs); PEFT's key names are accepted too. Unknown keys
        raise ValueError naming the closest known one."""
        source = source or cls.__name__
        known = cls._fields()
        peft_to_ours = {v: k for k, v in cls.PEFT_NAMES.items()}
        check_dict_keys(data, known, source, cls.__name__, aliases=peft_to_ours)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = peft_to_ours.get(key, key)
            if name in kwargs:
                raise ValueError(f"{source}: {name!r} is given twice (as {name!r} and as PEFT's {key!r})")
            kwargs[name] = value
        return build(cls, kwargs, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _peft_values(self) -> dict[str, Any]:
        """This class's own keys as PEFT writes them."""
        return {self.PEFT_NAMES.get(k, k): v for k, v in self.to_dict().items()}

    def to_peft_dict(self, target_modules=None, **extra: Any) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT writes (``target_modules`` is unused: no module is
        targeted). ``task_type`` is always CAUSAL_LM, the only task loraforge builds these for
        (PEFT picks PeftModelForCausalLM by it, which is what prepends the virtual tokens)."""
        out = {
            "auto_mapping": None,
            "base_model_name_or_path": None,
            "revision": None,
            "modules_to_save": None,
            **self._peft_values(),
            "peft_type": self.peft_type,
            "inference_mode": True,  # (PEFT writes true: the file holds the final table only)
        }
        out.update({k: v for k, v in extra.items() if k != "task_type"})
        out["task_type"] = "CAUSAL_LM"
        return out

    @classmethod
    def _value_from_peft(cls, key: str, value: Any, source: str) -> Any:
        return value

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json"):
        """Map PEFT's ``adapter_config.json`` onto this config, type-checking every value; keys
        loraforge cannot honour are refused (unknown ones ignored, with a warning, when null /
        false / empty). The result is in ``inference_mode``: the file holds the final table."""
        if data.get("peft_type") != cls.peft_type:
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}, not {cls.peft_type!r}")
        task = data.get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise ValueError(
                f"{source}: task_type {task!r}: loraforge builds {cls.peft_type} for decoder-only causal LMs "
                "(CAUSAL_LM) only"
            )
        if data.get("modules_to_save") not in (None, []):
            raise ValueError(
                f"{source}: modules_to_save={data['modules_to_save']!r} is not supported with prompt learning"
            )
        peft_to_ours = {v: k for k, v in cls.PEFT_NAMES.items()}
        known = set(cls._fields())
        kwargs: dict[str, Any] = {}
        others: dict[str, Any] = {}
        for key, value in data.items():
            name = peft_to_ours.get(key, key)
            if key in ("peft_type", "modules_to_save"):
                continue
            if name in known and key not in _METADATA:
                kwargs[name] = cls._value_from_peft(key, value, source)
            else:
                others[key] = value
        check_file_keys(others, source)
        kwargs["inference_mode"] = True
        # (a bad value names the field as the file spells it: prompt_tuning_init, not init)
        return build(cls, kwargs, source, rename=lambda name: cls.PEFT_NAMES.get(name, name))


@dataclass
class PrefixTuningConfig(_PromptLearning):
    """Prefix tuning (Li & Liang 2021): trainable keys and values put before every sequence's own,
    in every attention layer.

    Per adapter a table ``T`` (num_virtual_tokens × 2·L·D) holds, for each of the L layers, a key
    and a value row per virtual token (D = ``token_dim`` = head_dim · num_key_value_heads). Layer
    l attends to ``K_l = T[:, 2l·D:(2l+1)·D]``, ``V_l = T[:, (2l+1)·D:(2l+2)·D]`` (split into heads)
    before the tokens' own keys and values; the real tokens take positions from
    ``num_virtual_tokens`` on, as in PEFT. The prefix is passed through the model's KV cache, so
    it costs num_virtual_tokens positions of the context window and K/V memory per layer.

    prefix_projection: reparameterise ``T = W2·tanh(W1·E + b1) + b2`` with E (num_virtual_tokens ×
        D) and a hidden width ``encoder_hidden_size`` (default D): trains more stably; the file
        stores T (``prompt_embeddings``) only.
    encoder_hidden_size: the projection's hidden width (None: token_dim).
    init_weights: None (random) or "zero" (T starts at zero: the last projection, or T itself).
    """

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    peft_type = "PREFIX_TUNING"
    method = "prefix"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(
                f"PrefixTuningConfig.prefix_projection must be true or false, got {self.prefix_projection!r}"
            )
        if self.encoder_hidden_size is not None and (
            not _is_int(self.encoder_hidden_size) or self.encoder_hidden_size <= 0
        ):
            raise ValueError(
                f"PrefixTuningConfig.encoder_hidden_size must be a positive integer or None, "
                f"got {self.encoder_hidden_size!r}"
            )
        if self.init_weights not in (None, "zero"):
            raise ValueError(
                f"PrefixTuningConfig.init_weights must be null or 'zero', got {self.init_weights!r}"
            )

    def model_dims(self, model_config) -> dict[str, int]:
        dims = super().model_dims(model_config)
        c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        kv_heads = getattr(c, "num_key_value_heads", None)
        if _is_int(kv_heads):  # grouped-query attention: the cache holds kv_heads heads (PEFT #1901)
            head_dim = getattr(c, "head_dim", None) or dims["token_dim"] // dims["num_attention_heads"]
            dims["token_dim"] = head_dim * kv_heads
            dims["num_attention_heads"] = kv_heads
        return dims

    def resolved(self, model_config):
        out = super().resolved(model_config)
        if out.encoder_hidden_size is None:
            out = dataclasses.replace(out, encoder_hidden_size=out.token_dim)
        return out

    def table_shape(self) -> tuple[int, int]:
        return (self.num_virtual_tokens, 2 * self.num_layers * self.token_dim)


PROMPT_INITS = ("random", "text", "sample_vocab")


@dataclass
class PromptTuningConfig(_PromptLearning):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trainable embeddings (each of the
    model's hidden size) put before every sequence's input embeddings.

    The model sees ``[P ; embed(input_ids)]`` (batch × (num_virtual_tokens + T) × hidden): the
    attention mask gets ones and the labels -100 for the virtual tokens, and the outputs (logits,
    hidden states) cover the virtual positions too, as PEFT's do. Costs num_virtual_tokens
    positions of the context window and as many extra positions of compute per sequence.

    init: "random" (N(0, 1), nn.Embedding's), "text" (the input embeddings of ``init_text``
        tokenized by ``tokenizer``, repeated or cut to num_virtual_tokens, as PEFT does) or
        "sample_vocab" (embeddings of random vocabulary entries).
    init_text: for init="text": the text whose token embeddings start the virtual tokens.
    tokenizer / tokenizer_kwargs: for init="text": a tokenizer path (``AutoTokenizer``; never
        trust_remote_code).
    """

    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    tokenizer_kwargs: dict | None = None

    peft_type = "PROMPT_TUNING"
    method = "prompt"
    PEFT_NAMES = {
        "init": "prompt_tuning_init",
        "init_text": "prompt_tuning_init_text",
        "tokenizer": "tokenizer_name_or_path",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.init, str):
            self.init = self.init.lower()
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptTuningConfig.init must be one of {PROMPT_INITS}, got {self.init!r}")
        for key in ("init_text", "tokenizer"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ValueError(
                    f"PromptTuningConfig.{key} must be a string or None, got {getattr(self, key)!r}"
                )
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise ValueError(
                f"PromptTuningConfig.tokenizer_kwargs must be a mapping, got {self.tokenizer_kwargs!r}"
            )
        if self.init == "text" and (not self.init_text or not self.tokenizer):
            raise ValueError("PromptTuningConfig.init_text and tokenizer must be given with init='text'")
        if self.tokenizer_kwargs and self.init != "text":
            raise ValueError("PromptTuningConfig.tokenizer_kwargs must only be given with init='text'")

    def _peft_values(self) -> dict[str, Any]:
        out = super()._peft_values()
        out["prompt_tuning_init"] = self.init.upper()
        return out


ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(_PromptLearning):
    """P-tuning (Liu et al. 2021; PEFT's PromptEncoderConfig, peft_type P_TUNING): virtual token
    embeddings put before the input embeddings as in prompt tuning, but produced by an encoder
    from ``E`` (num_virtual_tokens × hidden):

    - "MLP": ``P = W3·relu(W2·relu(W1·E + b1) + b2) + b3`` (widths hidden → h → h → hidden, h =
      ``encoder_hidden_size``, default hidden; ``encoder_num_layers`` is ignored, as in PEFT);
    - "LSTM": ``P = MLP(biLSTM(E))``: an ``encoder_num_layers`` bidirectional LSTM of width h
      (dropout ``encoder_dropout`` between its layers), then Linear(2h, 2h), ReLU, Linear(2h, hidden).

    The file stores P (``prompt_embeddings``) only. Inputs, mask, labels and outputs as for
    :class:`PromptTuningConfig`.

    encoder_reparameterization_type: "MLP" or "LSTM" (the encoder above).
    encoder_hidden_size: the encoder's width h (None: the model's hidden size).
    encoder_num_layers: the LSTM's layers (the MLP ignores it, as PEFT's does).
    encoder_dropout: dropout between the LSTM's layers.
    """

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    peft_type = "P_TUNING"
    method = "p_tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = self.encoder_reparameterization_type
        if isinstance(kind, str):
            self.encoder_reparameterization_type = kind = kind.upper()
        if kind not in ENCODER_TYPES:
            raise ValueError(
                f"PromptEncoderConfig.encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}"
            )
        if self.encoder_hidden_size is not None and (
            not _is_int(self.encoder_hidden_size) or self.encoder_hidden_size <= 0
        ):
            raise ValueError(
                "PromptEncoderConfig.encoder_hidden_size must be a positive integer or None, "
                f"got {self.encoder_hidden_size!r}"
            )
        if not _is_int(self.encoder_num_layers) or self.encoder_num_layers <= 0:
            raise ValueError(
                "PromptEncoderConfig.encoder_num_layers must be a positive integer, "
                f"got {self.encoder_num_layers!r}"
            )
        if (
            not isinstance(self.encoder_dropout, (int, float))
            or isinstance(self.encoder_dropout, bool)
            or not 0.0 <= self.encoder_dropout < 1.0
        ):
            raise ValueError(
                f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}"
            )

    def resolved(self, model_config):
        out = super().resolved(model_config)
        if out.encoder_hidden_size is None:
            out = dataclasses.replace(out, encoder_hidden_size=out.token_dim)
        return out


CONFIGS = (PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig)
