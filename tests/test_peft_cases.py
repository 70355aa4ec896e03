"""PEFT's own custom-model LoRA cases (peft's tests/test_custom_models.py, ``TEST_CASES``) run on
loraforge and pinned against the installed peft (``peft_pin.pin``: random factors on both sides,
forward, gradients, safe merge / unmerge, merged weights, files both ways).

The small models have the shapes PEFT's cases use (a vanilla MLP, an embedding + GPT-2 Conv1D,
Conv1d / Conv2d / grouped Conv2d / Conv3d models, multi-head attention, an MLP whose layers are
bare parameters) and take PEFT's test input, ``arange(90)`` as a 9 x 10 matrix. LoRA variants
outside loraforge's scope (KaSA, MiCA, VeLoRA, MonteCLoRA, aLoRA) are left out. Each case names
the option it exercises (None: plain LoRA).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft_pin import peft_mha_out_proj_once, pin
from torch import nn

pytest.importorskip("peft", reason="the peft package pins the reference numbers")


class Sequence(nn.Module):
    """Named layers applied in order; ``shape[i]`` reshapes the activation before layer i."""

    def __init__(
        self, layers: dict[str, nn.Module], shapes: dict[str, tuple] | None = None, ids: bool = False
    ):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.shapes, self.ids = shapes or {}, ids

    def forward(self, x):
        x = x if self.ids else x.float()
        for name, layer in self.named_children():
            if name in self.shapes:
                x = x.reshape(self.shapes[name])
            x = layer(x)
        return x


class Attention(nn.Module):
    """Unbatched self-attention over the 9 rows of the input, then a linear head."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        x = x.float()
        return torch.log_softmax(self.lin0(self.mha(x, x, x)[0]), -1)


class ParamLinear(nn.Module):
    """A linear map held as a bare (in x out) parameter: what target_parameters adapts."""

    def __init__(self, fin: int, fout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fin, fout))
        self.bias = nn.Parameter(torch.ones(fout))

    def forward(self, x):
        return x @ self.weight + self.bias


def _mlp(param: bool = False):
    lin = ParamLinear if param else nn.Linear
    return Sequence({"lin0": lin(10, 20), "relu": nn.ReLU(), "lin1": lin(20, 2), "sm": nn.LogSoftmax(-1)})


def _emb_conv1d():
    from transformers.pytorch_utils import Conv1D

    layers = {"emb": nn.Embedding(100, 5), "conv1d": Conv1D(1, 5), "relu": nn.ReLU(), "flat": nn.Flatten()}
    return Sequence({**layers, "lin0": nn.Linear(10, 2), "sm": nn.LogSoftmax(-1)}, ids=True)


def _conv(conv: nn.Module, shape: tuple, features: int, pre: dict | None = None, flat: bool = False):
    """A convolution (reshaping its input to ``shape``) + ReLU + linear head over ``features``;
    ``pre``: layers before it; ``flat``: the whole input is one row (90 values) for them."""
    pre = pre or {}
    name = f"conv{conv.weight.dim() - 2}d"  # conv1d / conv2d / conv3d
    head = "lin1" if "lin0" in pre else "lin0"
    layers = {**pre, name: conv, "relu": nn.ReLU(), "flat": nn.Flatten(), head: nn.Linear(features, 2)}
    shapes = {name: shape, **({next(iter(pre)): (1, 90)} if flat else {})}
    return Sequence({**layers, "sm": nn.LogSoftmax(-1)}, shapes=shapes)


MODELS = {
    "MLP": _mlp,
    "MlpUsingParameters": lambda: _mlp(param=True),
    "EmbConv1D": _emb_conv1d,
    "Conv1d": lambda: _conv(nn.Conv1d(1, 1, 2), (-1, 1, 10), 9),
    "Conv2d": lambda: _conv(nn.Conv2d(5, 10, 3), (-1, 5, 3, 3), 10),
    # (r = 8 is divisible by groups = 8; the linear maps the 90 inputs onto 2 x 16 x 3 x 3)
    "Conv2dGroups": lambda: _conv(
        nn.Conv2d(16, 16, 3, groups=8), (2, 16, 3, 3), 16, pre={"lin0": nn.Linear(90, 288)}, flat=True
    ),
    "Conv2dGroups2": lambda: _conv(
        nn.Conv2d(16, 32, 3, padding=1, groups=2),
        (2, 16, 3, 3),
        288,
        pre={"lin0": nn.Linear(90, 288)},
        flat=True,
    ),
    "Conv3d": lambda: _conv(nn.Conv3d(5, 10, 3), (-1, 5, 3, 3, 3), 10, pre={"lin0": nn.Linear(10, 30)}),
    "Conv3d1x1": lambda: _conv(nn.Conv3d(5, 10, 1), (-1, 5, 3, 3, 2), 180),
    "MHA": Attention,
}

# (name, model, peft.LoraConfig kwargs, the loraforge option it needs that may not be built yet)
CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}, None),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}, None),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}, None),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}, None),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, None),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}, None),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}, "use_dora"),
    (
        "Vanilla MLP 8 LoRA with DoRA",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "use_dora": True},
        "use_dora",
    ),
    (
        "Vanilla MLP 9 LoRA with DoRA",
        "MLP",
        {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32},
        "use_dora",
    ),
    ("Embedding + Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}, None),
    ("Embedding + Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}, None),
    ("Embedding + Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}, None),
    ("Embedding + Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}, "use_dora"),
    ("Embedding + Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}, "use_dora"),
    (
        "Embedding + Conv1D 3 DoRA",
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d"], "use_dora": True},
        "use_dora",
    ),
    (
        "Embedding + Conv1D 1 LoRA trainable_tokens",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
        "trainable_token_indices",
    ),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}, None),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}, "use_dora"),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}, None),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}, None),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}, "use_dora"),
    (
        "Conv2d 2 LoRA with DoRA",
        "Conv2d",
        {"target_modules": ["conv2d", "lin0"], "use_dora": True},
        "use_dora",
    ),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}, None),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}, None),
    (
        "Conv2d Groups LoRA with DoRA",
        "Conv2dGroups",
        {"target_modules": ["conv2d"], "use_dora": True},
        "use_dora",
    ),
    (
        "Conv2d Groups2 LoRA with DoRA",
        "Conv2dGroups2",
        {"target_modules": ["conv2d"], "use_dora": True},
        "use_dora",
    ),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}, None),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}, None),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}, "use_dora"),
    (
        "Conv3d 2 LoRA with DoRA",
        "Conv3d",
        {"target_modules": ["conv3d", "lin0"], "use_dora": True},
        "use_dora",
    ),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", {"target_modules": ["conv3d"]}, None),
    ("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", {"target_modules": ["conv3d"], "use_dora": True}, "use_dora"),
    # (lora_alpha ≠ r, so that the scaling of B's bias shows)
    (
        "Vanilla MLP 1 LoRA with lora_b bias",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
        None,
    ),
    (
        "Conv2d 1 LoRA with lora_b bias",
        "Conv2d",
        {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
        None,
    ),
    (
        "Conv3d 1 LoRA with lora_b bias",
        "Conv3d",
        {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
        None,
    ),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}, None),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}, None),
    (
        "MLP 1 using nn.Parameter LoRA",
        "MlpUsingParameters",
        {"target_parameters": ["lin0.weight"]},
        "target_parameters",
    ),
    (
        "MLP 2 using nn.Parameter LoRA",
        "MLP",
        {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
        "target_parameters",
    ),
]


def _inputs(model_name: str) -> tuple:
    return (torch.arange(90).view(9, 10),)  # PEFT's test input (token ids for EmbConv1D)


@pytest.mark.parametrize("name, model, kwargs, feature", CASES, ids=[c[0] for c in CASES])
def test_peft_lora_case(name, model, kwargs, feature, tmp_path):  # noqa: ARG001 (the table's column)
    torch.manual_seed(0)
    base = MODELS[model]().eval()
    # (see peft_pin: PEFT 0.21.2's MultiheadAttention adds the out_proj update twice; its 1x1x1
    # Conv3d merge fails)
    with peft_mha_out_proj_once() if model == "MHA" else contextlib.nullcontext():
        pin(
            base, kwargs, _inputs(model), tmp_path,
            mergeable=not model.startswith("Conv2dGroups"), peft_merges=model != "Conv3d1x1",
        )  # fmt: skip


def test_the_table_covers_peft_lora_cases():
    # every option of issue 18 that PEFT's table exercises is in ours
    used = {k for _, _, kwargs, _ in CASES for k in kwargs}
    assert {
        "use_dora",
        "lora_bias",
        "target_parameters",
        "trainable_token_indices",
        "modules_to_save",
    } <= used
    assert {m for _, m, _, _ in CASES} == set(MODELS)
