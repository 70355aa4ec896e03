"""LoRA on nn.Conv1d / Conv2d / Conv3d, grouped or not, pinned against PEFT's ``_ConvNd`` layer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_pin import pin
from torch import nn

import loraforge as lf
from loraforge.layers import LoraConv1d, LoraConv2d, LoraConv3d, wrapper_class

pytest.importorskip("peft", reason="the peft package pins the reference numbers")


class Net(nn.Module):
    """A convolution then a linear head; ``dims`` = 1, 2 or 3 spatial dimensions."""

    def __init__(self, conv: nn.Module, dims: int, size: int = 6):
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(conv.out_channels, 3)
        self.dims, self.size, self.channels = dims, size, conv.in_channels

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=tuple(range(2, 2 + self.dims))))

    def inputs(self, batch: int = 3):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(batch, self.channels, *(self.size,) * self.dims, generator=g),)


CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# (dims, conv kwargs, rank): plain, strided / padded, grouped, depthwise
SETUPS = [
    (1, dict(in_channels=4, out_channels=6, kernel_size=3), 4),
    (1, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), 4),
    (1, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2), 4),
    (1, dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, bias=False), 4),
    (2, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding=1), 2),
    (2, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2), 4),
    (2, dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=3), 3),
    (3, dict(in_channels=2, out_channels=4, kernel_size=3), 2),
    (3, dict(in_channels=4, out_channels=4, kernel_size=(1, 2, 3), stride=(1, 2, 1)), 3),
    (3, dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2), 2),
]


def _net(dims: int, kwargs: dict) -> Net:
    torch.manual_seed(0)
    return Net(CONVS[dims](**kwargs), dims).eval()


@pytest.mark.parametrize("dims, kwargs, r", SETUPS, ids=[f"{d}d-{i}" for i, (d, _, _) in enumerate(SETUPS)])
def test_conv_pinned_against_peft(dims, kwargs, r, tmp_path):
    base = _net(dims, kwargs)
    groups = kwargs.get("groups", 1)
    cfg = {"target_modules": ["conv", "head"], "r": r, "lora_alpha": 3 * r, "use_rslora": dims == 3}
    ours, _ = pin(base, cfg, base.inputs(), tmp_path, mergeable=groups == 1)
    layer = ours.conv
    assert type(layer) is {1: LoraConv1d, 2: LoraConv2d, 3: LoraConv3d}[dims]
    # PEFT's layout: A a dense conv (in -> r) with the base's kernel, B a grouped kernel-1 conv
    assert layer.lora_A["default"].weight.shape == (r, kwargs["in_channels"], *layer.base_layer.kernel_size)
    assert layer.lora_B["default"].weight.shape == (kwargs["out_channels"], r // groups, *(1,) * dims)
    assert layer.lora_B["default"].groups == groups


def test_grouped_merge_refused_before_anything_changes():
    # the Linear head comes first in the model's layers: it must not be merged either
    base = Net(nn.Conv2d(4, 6, 3, groups=2), 2)
    net = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, target_modules=["head", "conv"], init=False))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for merge in (lf.merge, lf.merge_and_unload):
        with pytest.raises(ValueError, match="groups=2 cannot be merged"):
            merge(net)
        assert lf.merged_adapters(net) == []
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # unmerged it runs, and delete gives the plain model back
    net(*base.inputs()).sum().backward()
    assert net.conv.lora_A["default"].weight.grad is not None
    lf.delete_adapter(net, "default")
    assert type(net.conv) is nn.Conv2d


def test_rank_not_divisible_by_groups_is_refused_untouched():
    net = Net(nn.Conv1d(4, 6, 3, groups=2), 1)
    with pytest.raises(ValueError, match=r"target 'conv'.*groups=2 needs a rank divisible by 2, got r=3"):
        lf.inject(net, lf.LoraConfig(r=3, target_modules=["conv", "head"]))
    assert type(net.conv) is nn.Conv1d and type(net.head) is nn.Linear
    # a per-module rank that fits is fine
    lf.inject(net, lf.LoraConfig(r=3, rank_pattern={"conv": 2}, target_modules=["conv", "head"]))
    assert net.conv.r["default"] == 2


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_inits_refused_on_grouped_conv(init):
    net = Net(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(ValueError, match=f"init='{init}' needs a mergeable layer"):
        lf.inject(net, lf.LoraConfig(r=2, init=init, target_modules=["conv"]))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_inits_on_conv3d_start_at_the_base(init):
    base = _net(3, dict(in_channels=3, out_channels=5, kernel_size=2))
    net = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=2, alpha=4, init=init, target_modules=["conv"]))
    (x,) = base.inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x), base(x), rtol=0, atol=1e-5)
    assert not torch.equal(net.conv.base_layer.weight, base.conv.weight)  # the residual


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=2, dilation=2),
    nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"),
    nn.Conv3d(2, 4, 2, padding=1, padding_mode="reflect"),
])  # fmt: skip
def test_dilation_and_padding_mode_merge_exactly(conv):
    # (PEFT's A ignores the base's dilation and padding mode; loraforge's branch is the conv by ΔW)
    dims = conv.weight.dim() - 2
    torch.manual_seed(0)
    net = lf.inject(Net(conv, dims).eval(), lf.LoraConfig(r=2, init=False, target_modules=["conv"]))
    (x,) = net.inputs()
    with torch.no_grad():
        unmerged = net(x)
        lf.merge(net)
        torch.testing.assert_close(net(x), unmerged, rtol=0, atol=1e-5)


def test_mixed_batch_on_conv1d_and_conv3d():
    for dims, conv in ((1, nn.Conv1d(3, 4, 3, groups=1)), (3, nn.Conv3d(2, 4, 2, groups=2))):
        torch.manual_seed(0)
        net = lf.inject(Net(conv, dims).eval(), lf.LoraConfig(r=2, init=False, target_modules=["conv"]))
        lf.add_adapter(net, "other", lf.LoraConfig(r=4, init=False, target_modules=["conv"]))
        (x,) = net.inputs(batch=3)
        with torch.no_grad():
            rows = ["other", "__base__", "default"]
            with lf.adapter_batch(net, rows):
                mixed = net(x)
            for i, name in enumerate(rows):
                if name == "__base__":
                    with lf.disable_adapters(net):
                        alone = net(x)
                else:
                    lf.set_adapter(net, name)
                    alone = net(x)
                torch.testing.assert_close(mixed[i], alone[i], rtol=0, atol=1e-6)


def test_wrapper_class_and_target_check():
    assert wrapper_class(nn.Conv1d(1, 1, 1)) is LoraConv1d
    assert wrapper_class(nn.Conv3d(1, 1, 1)) is LoraConv3d
    net = nn.Sequential(nn.ConvTranspose2d(2, 2, 2))
    with pytest.raises(ValueError, match="target '0' is a ConvTranspose2d; LoRA supports"):
        lf.inject(net, lf.LoraConfig(target_modules=["0"]))
