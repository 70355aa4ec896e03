"""Low-rank algebra shared by ``extract``, ``resize`` and ``analyze``.

A layer's update is handled as one 2-D matrix ΔW of shape (out, in_flat): a Linear's (out, in),
a Conv's (out, in/groups·k·k), an Embedding's (num_embeddings, dim) — the layout of PEFT's B·A
product. Everything here works in float32 or float64 (``as_matrix``), whatever the inputs hold.

Truncation. The SVD ΔW = U·diag(S)·Vᵀ with S descending; keeping k terms keeps the Frobenius
energy ``Σ_{i<k} S_i² / ‖ΔW‖_F²`` and is the best rank-k approximation (Eckart–Young). The kept
part is split symmetrically, B = U_k·√S_k (out, k), A = √S_k·V_kᵀ (k, in_flat), so B·A is the
truncation with scale 1 and neither factor dominates the other's magnitude (as mergekit and
kohya's scripts write it).

Spectra. For singular values s (descending): stable rank ``‖s‖₂² / s_0²``; effective rank
``exp(H(p))`` with p = s / Σs (Roy & Vetterli 2007); energy at k as above.

Subspaces (LoRA paper, section 7). For orthonormal column bases V1 (n, r1) and V2 (n, r2),
φ(i, j) = ‖V1[:, :i]ᵀ V2[:, :j]‖_F² / min(i, j) ∈ [0, 1]: 1 when one span contains the other,
about max(i, j)/n for random subspaces. The amplification factor of ΔW with respect to W is
‖ΔW‖_F / ‖U_rᵀ W V_r‖_F, U_r and V_r the top-r singular vectors of ΔW: how much ΔW enlarges
the directions W already has there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# above this smaller side and for a rank well below it a randomized SVD (Halko et al. 2011:
# torch.svd_lowrank, a few power iterations) replaces the full one: O(out·in·k) instead of
# O(out·in·min(out, in)); its top singular values match the full SVD's to ~1e-6 relative for
# the fast-decaying spectra fine-tunes have
RANDOMIZED_ABOVE = 1024


def as_matrix(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``t`` as a 2-D (rows, rest) matrix in ``dtype`` (conv kernels flattened as PEFT's B·A)."""
    if t.dim() == 0:
        raise ValueError("a scalar has no singular values")
    t = t.detach()
    return (t.reshape(t.shape[0], -1) if t.dim() != 2 else t).to(dtype)


def delta_of(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B·A as an (out, in_flat) float32 matrix, for A (r, in…) and B (out, r…)."""
    return scale * (as_matrix(b) @ as_matrix(a))


def factored(
    a: torch.Tensor, b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW = scale·B·A as Qb·C·Qaᵀ, never forming ΔW: (Qb (out, p), C (p, q), Qa (in_flat, q)) in float64.

    From the reduced QR factorisations B = Qb·Rb and Aᵀ = Qa·Ra (p, q ≤ r): C = scale·Rb·Raᵀ.
    Qb and Qa have orthonormal columns, so ΔW's singular values are C's, and a truncation
    (b', a') of C is one of ΔW: B' = Qb·b', A' = a'·Qaᵀ, at O((out + in)·r²) cost.
    """
    qb, rb = torch.linalg.qr(as_matrix(b, torch.float64))
    qa, ra = torch.linalg.qr(as_matrix(a, torch.float64).T)
    return qb, scale * (rb @ ra.T), qa


def check_request(rank: int | None, energy: float | None, where: str = "") -> None:
    """Exactly one of ``rank`` (an integer ≥ 1) and ``energy`` (in (0, 1]) must be given."""
    at = f"{where}: " if where else ""
    if (rank is None) == (energy is None):
        raise ValueError(f"{at}give exactly one of rank and energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"{at}rank must be an integer >= 1, got {rank!r}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise ValueError(f"{at}energy must be a number in (0, 1], got {energy!r}")


def energy_at(s: torch.Tensor, k: int, total: float | None = None) -> float:
    """Σ_{i<k} s_i² / total (total defaults to Σ s_i²: the full spectrum given); 1 for a zero matrix."""
    sq = s.double().square()
    total = float(sq.sum()) if total is None else float(total)
    return 1.0 if total <= 0 else min(1.0, float(sq[:k].sum()) / total)


def rank_for_energy(s: torch.Tensor, energy: float, total: float | None = None) -> int:
    """The smallest k with ``energy_at(s, k, total) >= energy``; 0 for a zero matrix.

    ``total`` is ‖ΔW‖_F² when ``s`` is only the top of the spectrum; if even all of ``s`` falls
    short the answer is ``len(s)`` (the caller asks for more singular values).
    """
    sq = s.double().square()
    total = float(sq.sum()) if total is None else float(total)
    if total <= 0:
        return 0
    kept = torch.cumsum(sq, 0) / total
    # (a relative 1e-12 slack so that energy=1 keeps the rank an exact low-rank matrix has,
    # not the rounding noise of the zero singular values behind it)
    hit = torch.nonzero(kept >= energy - 1e-12)
    return int(hit[0]) + 1 if hit.numel() else s.numel()


def gram_svd(m: torch.Tensor, keep=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U (out, k), S (k,), Vh (k, in)) of 2-D float64 ``m`` from the eigendecomposition of
    its smaller Gram matrix: G = mᵀm (or m·mᵀ when m is wide), G = V·S²·Vᵀ, then S_i = ‖m·v_i‖
    and U_i = m·v_i / S_i (and the same with the roles swapped). k = min(out, in), or ``keep``: a
    count, or a function of the descending spectrum √eig(G) giving one (only those k columns of U
    are formed).

    Why not ``torch.linalg.svd``: on a (576, 1536) float64 matrix it is ~10x slower here (LAPACK's
    divide and conquer on the wide side); the Gram route costs one n × n ``eigh`` and two products.
    Its rounding: S² to ~n·eps·S_max² absolute, so singular values below ~1e-7·S_max are noise —
    but S_i is recomputed as ‖m·v_i‖ and B·A = m·V_k·V_kᵀ is the projection of m onto the kept
    directions whatever their accuracy, so a truncation is as good as the exact SVD's to ~1e-12.
    """
    wide = m.shape[0] < m.shape[1]
    x = m.T if wide else m  # (tall: rows >= columns)
    e, v = torch.linalg.eigh(x.T @ x)  # ascending
    e, v = e.flip(0), v.flip(1)
    k = e.numel() if keep is None else keep if isinstance(keep, int) else keep(e.clamp_min(0).sqrt())
    v = v[:, :k]
    xv = x @ v  # (rows, k): column i = x·v_i, of norm S_i
    s = xv.norm(dim=0)
    order = torch.argsort(s, descending=True)  # (rounding can swap neighbours)
    s, v, xv = s[order], v[:, order], xv[:, order]
    u = xv / torch.where(s > 0, s, torch.ones_like(s))
    return (v, s, u.T) if wide else (u, s, v.T)


def top_svd(m: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (out, k'), S (k',), Vh (k', in)) of the top k' = min(k, out, in) singular triplets of 2-D ``m``.

    All of them (:func:`gram_svd`) for small matrices or k near the full rank, randomized
    otherwise (seeded: the same input gives the same factors).
    """
    k = min(k, *m.shape)
    if is_small(m, k):
        u, s, vh = gram_svd(m.double(), k)
        return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=min(k + 10, *m.shape), niter=4)
    finally:
        torch.random.set_rng_state(state)
    return u[:, :k], s[:k], v[:, :k].T


def is_small(m: torch.Tensor, k: int) -> bool:
    """Whether :func:`top_svd` decomposes ``m`` whole for ``k`` directions (not randomized)."""
    return min(m.shape) <= RANDOMIZED_ABOVE or 4 * k >= min(m.shape)


@dataclass
class Truncation:
    """The kept part of one matrix: ``b @ a`` approximates it with ``rank`` terms."""

    a: torch.Tensor  # (rank, in_flat)
    b: torch.Tensor  # (out, rank)
    s: torch.Tensor  # (rank,) the kept singular values (float64)
    energy: float  # Frobenius energy kept, in [0, 1]
    max_sv: float  # the largest singular value (0 for a zero matrix)

    @property
    def rank(self) -> int:
        return int(self.s.numel())


def truncate(
    m: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    seed: int = 0,
) -> Truncation:
    """Best approximation of 2-D ``m`` of rank ``rank``, or of the smallest rank keeping ``energy``
    of its Frobenius energy (capped at ``max_rank``), split as B = U·√S, A = √S·Vᵀ.

    A zero matrix truncates to rank 0 (empty factors). The rank is never above min(out, in).
    The SVD runs in float64 (float32 rounding, ~1e-7 of ‖ΔW‖², would blur an energy like
    1 − 1e-9); the factors come back in ``m``'s dtype (float32 for a non-float input).
    """
    check_request(rank, energy)
    out_dtype = m.dtype if m.dtype.is_floating_point else torch.float32
    m = m.double()
    full = min(m.shape)
    total = float(m.square().sum())
    cap = full if max_rank is None else max(1, min(full, max_rank))
    if total == 0.0:
        u, s, vh = m.new_zeros(m.shape[0], 0), m.new_zeros(0), m.new_zeros(0, m.shape[1])
    elif rank is not None:
        u, s, vh = top_svd(m, min(rank, cap), seed)
    elif is_small(m, min(cap, 32)):  # (decomposed whole once; U formed for the kept columns only)
        u, s, vh = gram_svd(m, lambda sv: min(cap, max(1, rank_for_energy(sv, energy, total))))
    else:
        k = min(cap, 32)  # (grow a randomized SVD until the energy is reached or the cap is)
        while True:
            u, s, vh = top_svd(m, k, seed)
            need = rank_for_energy(s, energy, total)
            if need < s.numel() or s.numel() >= cap:
                break
            k = min(cap, 2 * k)
        u, s, vh = u[:, :need], s[:need], vh[:need]
    root = s.sqrt()
    return Truncation(
        a=(root[:, None] * vh).to(out_dtype),
        b=(u * root).to(out_dtype),
        s=s,
        energy=energy_at(s, s.numel(), total),
        max_sv=float(s[0]) if s.numel() else 0.0,
    )


def stable_rank(s: torch.Tensor) -> float:
    """‖s‖₂² / s_max²: how many directions carry the energy, robust to a long tail (0 if s = 0)."""
    s = s.double()
    return 0.0 if s.numel() == 0 or float(s.max()) == 0 else float(s.square().sum() / s.max().square())


def effective_rank(s: torch.Tensor) -> float:
    """exp(−Σ p_i log p_i) with p = s / Σ s (Roy & Vetterli): 1 for one direction, r for r equal ones."""
    s = s.double()
    total = float(s.sum())
    if s.numel() == 0 or total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def right_basis(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (in_flat, r) of the row space of A (r, in…): its right singular vectors,
    ordered by singular value, as the LoRA paper takes them for φ."""
    _, _, vh = torch.linalg.svd(as_matrix(a, torch.float64), full_matrices=False)
    return vh.T


def subspace_similarity(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for every i ≤ r1, j ≤ r2 as an (r1, r2) float64 tensor (entry [i-1, j-1]).

    ``v1`` (n, r1) and ``v2`` (n, r2) are orthonormal column bases ordered by importance (e.g.
    :func:`right_basis`). φ(i, j) = ‖v1[:, :i]ᵀ v2[:, :j]‖_F² / min(i, j), from one product and a
    2-D cumulative sum.
    """
    if v1.dim() != 2 or v2.dim() != 2 or v1.shape[0] != v2.shape[0]:
        raise ValueError(f"bases of one space needed, got shapes {tuple(v1.shape)} and {tuple(v2.shape)}")
    m = (v1.double().T @ v2.double()).square()
    cum = m.cumsum(0).cumsum(1)
    i = torch.arange(1, m.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, m.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def amplification_factor(delta: torch.Tensor, w: torch.Tensor, r: int | None = None) -> float:
    """‖ΔW‖_F / ‖U_rᵀ W V_r‖_F (LoRA paper, section 7.3), U_r, V_r the top-r singular vectors of ΔW
    (r defaults to ΔW's numerical rank). Large: ΔW amplifies directions W barely uses."""
    delta, w = as_matrix(delta, torch.float64), as_matrix(w, torch.float64)
    if delta.shape != w.shape:
        raise ValueError(f"ΔW {tuple(delta.shape)} and W {tuple(w.shape)} differ in shape")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if r is None:
        r = int((s > s[0] * 1e-6).sum()) if s.numel() and float(s[0]) > 0 else 0
    if r == 0:
        return 0.0
    proj = u[:, :r].T @ w @ vh[:r].T
    return float(delta.norm() / proj.norm())


def factored_amplification(a: torch.Tensor, b: torch.Tensor, scale: float, w: torch.Tensor) -> float:
    """:func:`amplification_factor` of ΔW = scale·B·A (r its numerical rank, the same rule), from
    ``factored``: U_r = Qb·U_C, V_r = Qa·V_C, so only the r × r core is decomposed and W is
    multiplied by thin matrices (O(out·in·r), not an SVD of the full out × in ΔW)."""
    qb, core, qa = factored(a, b, scale)
    w = as_matrix(w, torch.float64)
    if (qb.shape[0], qa.shape[0]) != tuple(w.shape):
        raise ValueError(f"ΔW {(qb.shape[0], qa.shape[0])} and W {tuple(w.shape)} differ in shape")
    u, s, vh = torch.linalg.svd(core)
    r = int((s > s[0] * 1e-6).sum()) if s.numel() and float(s[0]) > 0 else 0
    if r == 0:
        return 0.0
    proj = (qb @ u[:, :r]).T @ w @ (qa @ vh[:r].T)
    return float(core.norm() / proj.norm())
