"""Pin one small model + LoRA config against the installed peft: the checks the layer-type tests
(tests/layers/test_conv.py, test_mha.py, test_lora_options.py) and tests/test_peft_cases.py share.

``pin`` builds the adapter both ways with random factors (PEFT's ``init_lora_weights=False``) and
asserts: loraforge's own injection makes PEFT's file layout; PEFT's file loads into loraforge with
the same forward and the same gradients; merge (safe) / unmerge give the same merged weights as
PEFT's merge_and_unload and the base back bit for bit; loraforge's file loads into PEFT with the
same forward.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import loraforge as lf
from loraforge.adapter_files import _live_tensors, adapter_state_dict

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

PREFIX = "base_model.model."


def output(model, inputs) -> torch.Tensor:
    y = model(*inputs)
    return y[0] if isinstance(y, tuple) else y


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding, relative to the size of the values."""
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=0, atol=tol * scale)


def inject_copy(base, cfg: lf.LoraConfig):
    """loraforge's injection of ``cfg`` into a copy of ``base``, in eval mode."""
    return lf.inject(copy.deepcopy(base), cfg).eval()


def _lora_grads(model, ours: bool) -> dict[str, torch.Tensor]:
    """File key -> gradient of every adapter tensor that has one."""
    if ours:
        return {k: t.grad for k, t in _live_tensors(model, "default").items() if t.grad is not None}
    return {
        # (DoRA's m: live `lora_magnitude_vector.default.weight`, file key without `.weight`)
        n.replace(".modules_to_save.default", "")
        .replace(".default", "")
        .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
        for n, p in model.named_parameters()
        if p.grad is not None and ".default" in n
    }


@contextlib.contextmanager
def peft_mha_out_proj_once():
    """Within the block, PEFT's LoRA ``MultiheadAttention`` adds the out_proj update once.

    peft 0.21.2 (and its main branch; fix proposed in huggingface/peft PR #3774) writes
    W' + ΔW' into the out_proj weight and then calls the out_proj LoRA layer's own ``merge``,
    which adds ΔW' again: its forward and its merged weights use W' + 2·ΔW' (the gradient
    flows through one ΔW'). loraforge computes LoRA's W' + ΔW'. This makes the nested call
    only record the merge (and the matching unmerge only forget it), PR #3774's behaviour, so
    that the rest of PEFT's layer can be compared with loraforge's."""
    from peft.tuners.lora import layer

    mha = layer.MultiheadAttention
    merge, unmerge = mha.merge, mha.unmerge

    def merge_once(self, *args, **kwargs):
        out = self.base_layer.out_proj
        out.merge = lambda safe_merge=False, adapter_names=None: out.merged_adapters.extend(adapter_names)
        try:
            merge(self, *args, **kwargs)
        finally:
            del out.merge

    def unmerge_once(self):
        out = self.base_layer.out_proj
        out.unmerge = out.merged_adapters.clear
        try:
            unmerge(self)
        finally:
            del out.unmerge

    mha.merge, mha.unmerge = merge_once, unmerge_once
    try:
        yield
    finally:
        mha.merge, mha.unmerge = merge, unmerge


def pin(
    base, kwargs: dict, inputs: tuple, tmp_path, mergeable: bool = True,
    peft_merges: bool = True,
):  # fmt: skip
    """Run every check of the module docstring for ``peft.LoraConfig(**kwargs)`` on ``base``.
    ``mergeable=False``: both sides must refuse to merge (grouped convolutions), the model
    untouched. ``peft_merges=False``: PEFT's merge fails for this layer (peft 0.21.2 merges a
    1x1x1 Conv3d wrongly: its 1x1 shortcut squeezes two of the three kernel dimensions), so
    loraforge's merge is checked against the unmerged forward only. Returns (ours, theirs)."""
    torch.manual_seed(0)
    mine = inject_copy(base, lf.LoraConfig.from_dict({**kwargs, "init_lora_weights": False}))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)
    ).eval()
    file_keys = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert {k: tuple(v.shape) for k, v in adapter_state_dict(mine).items()} == file_keys
    with torch.no_grad():
        reference = output(base, inputs)
        assert not torch.equal(output(mine, inputs), reference)  # init False: B random, ΔW ≠ 0

    # PEFT's file -> loraforge: same forward, same gradients
    theirs.save_pretrained(tmp_path / "peft")
    ours = lf.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = output(theirs, inputs)
        close(output(ours, inputs), expected)
        assert (expected - reference).abs().max() > 1e-4
    for model in (ours, theirs):
        output(model, inputs).float().square().mean().backward()
    ours_g, theirs_g = _lora_grads(ours, True), _lora_grads(theirs, False)
    assert set(ours_g) == set(theirs_g) and ours_g
    for key in ours_g:
        close(ours_g[key], theirs_g[key])
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)

    # merge / unmerge
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    if mergeable:
        lf.merge(ours, safe=True)
        with torch.no_grad():
            close(output(ours, inputs), expected)
        lf.unmerge(ours)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), k
        merged_ours = lf.merge_and_unload(copy.deepcopy(ours), safe=True).state_dict()
        assert set(merged_ours) == set(base.state_dict())
        if peft_merges:
            merged_theirs = copy.deepcopy(theirs).merge_and_unload(safe_merge=True).state_dict()
            assert set(merged_ours) == set(merged_theirs)
            for k in merged_ours:
                close(merged_ours[k], merged_theirs[k])
    else:
        with pytest.raises((ValueError, NotImplementedError)):
            copy.deepcopy(theirs).merge_adapter()
        with pytest.raises(ValueError, match="cannot be merged"):
            lf.merge(ours)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), k

    # loraforge's file -> PEFT
    lf.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        close(output(back, inputs), expected)
    return ours, theirs
