"""Optimizers by name: PyTorch AdamW, and bitsandbytes' 8-bit and paged AdamW variants.

AdamW keeps two fp32 moments per trainable parameter (8 bytes each); ``adamw_8bit`` stores them
as blockwise-quantized uint8 (2 bytes), and the ``paged_*`` variants put them in CUDA unified
memory that the driver pages out to CPU RAM under memory pressure (on CPU they behave like the
unpaged ones).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
_BNB_CLASSES = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}


def param_groups(params: Iterable, weight_decay: float) -> list[dict]:
    """Split parameters into decayed (matrices: weights, LoRA A/B) and not decayed (vectors:
    biases, norm scales), the usual AdamW practice. Frozen parameters are dropped."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return params  # already groups
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def loraplus_param_groups(
    model: torch.nn.Module, lr: float, ratio: float, weight_decay: float = 0.0, embedding_lr: float = 1e-6
) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): the trainable parameters in groups whose learning rates differ.

    B factors (``lora_B``) and the adapters' vectors (biases, DoRA magnitudes: ``ndim == 1``) learn
    at ``ratio · lr``; A factors and everything else at ``lr``; the factors of LoRA on an
    embedding at ``embedding_lr`` (PEFT's ``create_loraplus_optimizer`` grouping, whose default
    for embeddings is 1e-6). Matrices decay by ``weight_decay``, vectors not (as ``param_groups``).
    Each group carries its own ``lr``, so a schedule (``LambdaLR``) scales all of them alike.
    """
    from .layers import LoraEmbedding

    embedding_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, LoraEmbedding)
        for p in m.parameters()
        if p.requires_grad
    }
    buckets: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            group_lr = embedding_lr
        elif "lora_B" in name or p.ndim == 1:
            group_lr = lr * ratio
        else:
            group_lr = lr
        buckets.setdefault((group_lr, weight_decay if p.ndim >= 2 else 0.0), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in buckets.items()]


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable tensors in ``params`` (tensors or param-group dicts).

    name: ``adamw`` | ``adamw_8bit`` | ``paged_adamw_8bit`` | ``paged_adamw_32bit``; the last
    three need the ``bitsandbytes`` package.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(params, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters to optimize (did the model get an adapter?)")
    groups = [g for g in groups if g["params"]]
    betas = tuple(betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            f"optimizer {name!r} needs bitsandbytes: pip install bitsandbytes (or use optimizer: adamw)"
        ) from e
    import warnings

    with warnings.catch_warnings():
        # bitsandbytes warns that paging needs CUDA and falls back to unpaged state on CPU.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        cls = getattr(bnb.optim, _BNB_CLASSES[name])
        return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
