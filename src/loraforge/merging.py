"""Task-arithmetic merges of LoRA adapters: the rules behind ``lf.add_weighted_adapter``.

A *task tensor* is what one adapter contributes to a layer: a factor (A or B) in the non-SVD
forms, the update ΔWᵢ = sᵢ·Bᵢ·Aᵢ in the ``_svd`` forms. Given task tensors τ₁ … τₙ of one shape,
weights w₁ … wₙ and a density d ∈ [0, 1]:

- **linear** (task arithmetic): Σ wᵢ·τᵢ.
- **magnitude_prune**: Σ wᵢ·trim(τᵢ), where trim keeps the ⌊d·numel⌋ entries of largest |·| and
  zeroes the rest.
- **dare_linear** (DARE, Yu et al. 2023): Σ wᵢ·drop(τᵢ), drop(τ) = τ ⊙ m / d with m ~ Bernoulli(d)
  per entry. Dropping at random and rescaling the survivors by 1/d keeps E[drop(τ)] = τ: most of a
  fine-tune's delta is redundant, so a model keeps its skill with most entries gone, and the
  survivors of different adapters then rarely collide.
- **ties** (TIES-merging, Yadav et al. 2023): trim each τᵢ as above, elect a sign per entry,
  γ = sign(Σᵢ τᵢ) ("total") or sign(Σᵢ sign τᵢ) ("frequency", a vote), with γ = +1 on a tie; then
  the disjoint mean Σᵢ [sign τᵢ = γ]·wᵢ·τᵢ / max(1, #{i : sign τᵢ = γ}). Averaging pulls a
  parameter towards zero where adapters disagree in sign and lets many small redundant values
  drown the few that matter; TIES drops the small values and, per entry, the minority sign.
- **dare_ties**: DARE's random drop + rescale in place of trim, then TIES's election and mean.

As in PEFT 0.21 (whose results these reproduce under the same ``torch.manual_seed``), the sign is
elected on the pruned, *unweighted* task tensors; the weights only scale each agreeing entry's
term. DARE draws ``torch.bernoulli`` from the global generator, one full tensor per task tensor,
in the order: layers as ``model.named_modules()`` lists them; within a layer the adapters in the
order given (the A factors of all adapters, then the B factors, in the non-SVD forms).
Differences from PEFT: density 0 gives zeros in DARE (PEFT divides 0 by 0 and gets NaN), and a
density outside [0, 1] or a missing one is an error (PEFT treats d > 1 as 1).

Non-SVD forms (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) merge
the A factors and the B factors separately, with weights ±√|wᵢsᵢ| on A (the sign of wᵢsᵢ on A
only, so that a negative weight flips ΔW instead of cancelling out) and √|wᵢsᵢ| on B: cheap, same
rank, but B·A is not Σ wᵢΔWᵢ even for ``linear`` (cross terms), and pruning a factor is not
pruning ΔW. They need equal ranks. The ``_svd`` forms (and ``svd``) merge the full ΔWᵢ, then keep
the top ``svd_rank`` singular triplets: B = U·S, A = Vᵀ (PEFT's split), optionally clamped to
±q, q the ``svd_clamp`` quantile of the entries of B and A together. Any ranks. TIES and DARE
were designed for full weight deltas, so the ``_svd`` forms are the faithful ones (the price: one
dense ΔW per adapter and layer, and an SVD); on the factors, "small" and "sign conflict" concern
entries of A and B, whose meaning depends on each adapter's own basis. With one adapter every
combination is ``linear`` (PEFT's rule).
"""

from __future__ import annotations

import math
import warnings

import torch

COMBINATIONS = (
    "linear", "cat", "svd",
    "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
)  # fmt: skip
EQUAL_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
WITH_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


# -- the algorithms on task tensors --------------------------------------------------------------
def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ⌊density·numel⌋ largest-|·| entries set to 0 (density ≥ 1: ``t``)."""
    if density >= 1:
        return t
    k = int(density * t.numel())  # (PEFT's count, rounding included)
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().flatten().topk(k).indices] = 1
    return t * keep.view(t.shape)


def dare_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """τ ⊙ m / density, m ~ Bernoulli(density) per entry from the global generator (one draw of
    ``t``'s shape and dtype); density ≥ 1: ``t``, no draw; density 0: zeros (after the draw)."""
    if density >= 1:
        return t
    kept = t * torch.bernoulli(torch.full_like(t, density))
    return kept / density if density > 0 else kept


def majority_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """For task tensors stacked on dim 0: the bool mask of the entries whose sign is the elected
    one, γ = sign(Σᵢ τᵢ) ("total") or sign(Σᵢ sign τᵢ) ("frequency"), +1 where that sum is 0.
    Zeros agree with neither sign."""
    signs = stacked.sign()
    score = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Σᵢ agreeᵢ·weightedᵢ / max(1, Σᵢ agreeᵢ) over dim 0: the mean of the agreeing terms."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_tasks(
    tensors: list[torch.Tensor],
    weights: list[float],
    method: str,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """Merge same-shape task tensors by ``method`` (``linear``, ``magnitude_prune``,
    ``dare_linear``, ``ties``, ``dare_ties``: see the module docstring). The weights are applied
    as float32 (as PEFT's weight tensor is), so the result is float32 or wider."""
    if method in ("magnitude_prune", "ties"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [dare_prune(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        return disjoint_mean(weighted, majority_sign(stacked, majority_sign_method))
    return weighted.sum(dim=0)


# -- argument checks -----------------------------------------------------------------------------
def check_options(combination, density, majority_sign_method, svd_clamp, svd_driver) -> None:
    """Raise ValueError (one line) for an unknown combination or an option it cannot take."""
    if combination not in COMBINATIONS:
        raise ValueError(
            f"add_weighted_adapter: combination must be one of {list(COMBINATIONS)}, got {combination!r}"
        )
    if combination.removesuffix("_svd") in WITH_DENSITY:
        bad = isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1
        if bad:  # (NaN fails 0 <= d <= 1 too)
            got = "it is missing" if density is None else f"got {density!r}"
            raise ValueError(
                f"add_weighted_adapter: combination={combination!r} needs density, the fraction of "
                f"entries kept, a number in [0, 1]; {got}"
            )
    elif density is not None:
        raise ValueError(
            f"add_weighted_adapter: density applies to ties, dare_linear, dare_ties, magnitude_prune "
            f"and their _svd forms, not to combination={combination!r}"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            "add_weighted_adapter: majority_sign_method must be 'total' or 'frequency', "
            f"got {majority_sign_method!r}"
        )
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1
    ):
        raise ValueError(f"add_weighted_adapter: svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
    if svd_driver not in SVD_DRIVERS:
        raise ValueError(
            f"add_weighted_adapter: svd_driver must be one of {list(SVD_DRIVERS)}, got {svd_driver!r}"
        )


def new_rank(combination: str, ranks: dict[str, int], svd_rank: int | None) -> int:
    """The combined adapter's rank: the common rank (non-SVD forms: refused if the ranks differ),
    Σ rᵢ for ``cat``, ``svd_rank`` or max rᵢ for the SVD forms."""
    if combination in EQUAL_RANK:
        if len(set(ranks.values())) != 1:
            raise ValueError(
                f"add_weighted_adapter: combination={combination!r} needs adapters of equal rank, "
                f"got {ranks}; 'cat' and the SVD forms combine different ranks"
            )
        return next(iter(ranks.values()))
    if combination == "cat":
        return sum(ranks.values())
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"add_weighted_adapter: svd_rank must be an integer >= 1, got {svd_rank!r}")
    return svd_rank or max(ranks.values())


def check_layer(path: str, layer, names: list[str], combination: str) -> None:
    """The non-SVD forms stack the adapters' factors: refuse a layer where their shapes differ
    (equal r, but a ``rank_pattern`` gives this layer other ranks)."""
    if combination in EQUAL_RANK and len(names) > 1:
        ranks = {n: layer.r[n] for n in names}
        if len(set(ranks.values())) != 1:
            raise ValueError(
                f"add_weighted_adapter: combination={combination!r} needs equal ranks in every layer; "
                f"at {path!r} the ranks are {ranks}"
            )


# -- one layer -----------------------------------------------------------------------------------
def combine_layer(
    layer,
    pairs,
    combination: str,
    rank: int,
    *,
    density=None,
    majority_sign_method="total",
    svd_clamp=None,
    svd_full_matrices=False,
    svd_driver=None,
):
    """(A, B) of rank ``rank`` on one ``LoraLayer`` for ``pairs`` = [(adapter, weight), …] (the
    adapters present on it), shaped as the layer's factors (zero-padded up to ``rank``)."""
    ref_a, ref_b = layer.factors(pairs[0][0])
    if combination == "cat":  # exactly Σ wᵢsᵢBᵢAᵢ: A = [w₁s₁A₁; …], B = [B₁ …]
        a = torch.cat([layer.factors(n)[0] * (w * layer.scaling[n]) for n, w in pairs], dim=0)
        b = torch.cat([layer.factors(n)[1] for n, _ in pairs], dim=1)
        return _pad(a, b, rank)
    if combination in EQUAL_RANK:
        ws = [w * layer.scaling[n] for n, w in pairs]
        # the sign on A's weights only: on both it would cancel in B·A
        wa = [math.copysign(math.sqrt(abs(x)), x) for x in ws]
        wb = [math.sqrt(abs(x)) for x in ws]
        a = merge_tasks(
            [layer.factors(n)[0] for n, _ in pairs], wa, combination, density, majority_sign_method
        )
        b = merge_tasks(
            [layer.factors(n)[1] for n, _ in pairs], wb, combination, density, majority_sign_method
        )
        return _pad(a.to(ref_a.dtype), b.to(ref_b.dtype), rank)
    method = combination.removesuffix("_svd") if combination != "svd" else "linear"
    flip = bool(getattr(layer, "fan_in_fan_out", False))
    # ΔWᵢ in the layout PEFT prunes (the base weight's: a Conv1D's is (in, out)), so that DARE's
    # draws fall on the same entries; the SVD then runs on the (out, in_flat) layout of B·A
    deltas = [layer.delta_weight(n).T if flip else layer.delta_weight(n) for n, _ in pairs]
    merged = merge_tasks(deltas, [w for _, w in pairs], method, density, majority_sign_method)
    m = layer._ba_layout(merged.T if flip else merged)
    if svd_driver is not None and m.device.type != "cuda":
        warnings.warn(
            f"add_weighted_adapter: svd_driver={svd_driver!r} applies to CUDA tensors only; ignored on "
            f"{m.device.type}",
            stacklevel=3,
        )
        svd_driver = None
    u, s, vh = torch.linalg.svd(m, full_matrices=svd_full_matrices, driver=svd_driver)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    a, b = _pad(a, b, rank)
    return a.reshape(rank, *ref_a.shape[1:]), b.reshape(ref_b.shape[0], rank, *ref_b.shape[2:])


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, …) and B (out, k, …) zero-padded to ``rank`` rows / columns (B·A unchanged)."""
    if a.shape[0] == rank:
        return a, b
    a_full = a.new_zeros(rank, *a.shape[1:])
    b_full = b.new_zeros(b.shape[0], rank, *b.shape[2:])
    a_full[: a.shape[0]], b_full[:, : b.shape[1]] = a, b
    return a_full, b_full
