"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every decoder layer is one FSDP unit and the loss module (``CausalLMLoss``, which owns the
embeddings, final norm and LM head) is the root unit. Each parameter of a unit (frozen or not) is
split on dim 0 over the ``W`` processes, so a process holds about ``1/W`` of the model:

    forward / backward of layer i:  all-gather its shards -> compute -> free the gathered copy
    after backward of layer i:      reduce-scatter its gradients (only trainable tensors have any)

A 4-bit base (``quant.Linear4bit``) shards as is: its packed weight is a ``uint8`` parameter of
shape ``(out·in/2, 1)``, split into byte ranges and gathered back to the same bytes; FSDP2's mixed
precision only casts floating parameters, and the quantization constants (absmax, code, nested
state) live in the layer's ``QuantState``, which every process keeps whole (a few percent of the
packed bytes). Nothing is ever cast back to float.

Gradients are averaged over processes in the reduce-scatter, as DDP averages them in its
all-reduce, so the loop's loss scaling (``loop.py``) is the same under both.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import FsdpSection

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model: the modules of the classes it names in
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ...), else the children of its
    longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_kwargs(opts: FsdpSection, mesh, device: torch.device) -> dict:
    """``fully_shard`` keyword arguments for ``train.fsdp``'s options."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mp = MixedPrecisionPolicy()
    if opts.mixed_precision != "none":
        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[opts.mixed_precision], reduce_dtype=torch.float32)
    offload = OffloadPolicy()
    if opts.cpu_offload and device.type != "cpu":  # on a CPU run the parameters are there already
        offload = CPUOffloadPolicy(pin_memory=True)
    return {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}


def shard_layer(layer: nn.Module, opts: FsdpSection, mesh, device: torch.device) -> None:
    """Make one decoder layer an FSDP unit (its parameters become sharded DTensors)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(layer, reshard_after_forward=opts.reshard_after_forward, **shard_kwargs(opts, mesh, device))


def shard_root(root: nn.Module, opts: FsdpSection, mesh, device: torch.device) -> None:
    """Make ``root`` (the loss module) the root unit over every parameter not in a layer unit. Its
    gathered weights stay until the backward, which starts with them (FSDP2's default for a root)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(root, reshard_after_forward=False, **shard_kwargs(opts, mesh, device))


def shard_model(model: nn.Module, root: nn.Module, opts: FsdpSection, mesh, device: torch.device) -> int:
    """Shard every decoder layer of ``model`` not sharded yet, then ``root``; returns the number of
    layer units. (A model loaded shard by shard has its layers sharded already.)"""
    layers = decoder_layers(model)
    for layer in layers:
        if not is_sharded(layer):
            shard_layer(layer, opts, mesh, device)
    shard_root(root, opts, mesh, device)
    return len(layers)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard_all(root: nn.Module) -> None:
    """Put every unit under ``root`` (itself included) back to its shards after a forward without
    a backward (evaluation, sample generation), which leaves gathered what FSDP keeps for the
    backward (the root; the layers with reshard_after_forward: false): until resharded, such a
    unit's parameters are the gathered tensors, not the shards the optimizer and checkpoints hold."""
    for module in root.modules():
        if is_sharded(module):
            module.reshard()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (D)Tensor; a plain tensor is its own."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process must call it); a plain one as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters held by this process, bytes of the whole model's parameters); the
    quantization constants of 4-bit layers count in both (every process holds them whole)."""
    from ..quant.linear4bit import Linear4bit

    mine = whole = 0
    for p in model.parameters():
        mine += local_tensor(p).numel() * p.element_size()
        whole += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.quant_state is not None:
            n = sum(t.numel() * t.element_size() for t in m.quant_state.as_tensors().values())
            mine, whole = mine + n, whole + n
    return mine, whole


def gradient_sync(module: nn.Module, enabled: bool):
    """Context: reduce-scatter gradients after this backward (``enabled``) or keep accumulating
    them unsharded until the last micro-batch (FSDP2's counterpart of DDP's ``no_sync``)."""
    if not is_sharded(module):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    return ctx()


@contextlib.contextmanager
def gathered_trainable(model: nn.Module):
    """Within the block, every trainable parameter of ``model`` is its whole tensor (gathered from
    the shards on every process: a collective), so code that reads parameters (``save_adapter``)
    sees an ordinary model; the shards are put back afterwards. Only the trainable tensors travel:
    the frozen base stays sharded."""
    swapped = []
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                        module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=True)
                        swapped.append((module, name, p))
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process, on the CPU, gathered one tensor at a time
    (full fine-tuning's result); an empty dict on the others. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def for_each_unit(model: nn.Module, root: nn.Module, fn) -> int:
    """Run ``fn(module)`` on each decoder layer while its unit is gathered, then on ``model`` while
    the root is (for code that runs submodules outside the model's forward, such as the fast
    kernels' probe); returns the sum of the results."""
    total = 0
    for layer in decoder_layers(model):
        with unsharded(layer):
            total += fn(layer)
    with unsharded(root):
        total += fn(model)
    return total


@contextlib.contextmanager
def unsharded(unit: nn.Module):
    """Gather one unit's own parameters (not its sub-units') for the block; as is when not sharded."""
    if not is_sharded(unit):
        yield
        return
    unit.unshard()
    try:
        yield
    finally:
        unit.reshard()
