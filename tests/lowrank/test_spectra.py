"""The shared low-rank algebra against hand computations and exact low-rank matrices."""

import math

import pytest
import torch

from loraforge.lowrank import spectra


def _rank_k(out, inn, k, seed=0, decay=1.0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inn, k, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0 * decay**i for i in range(k)], dtype=torch.float64)
    return (u * s) @ v.T, s


@pytest.mark.parametrize("shape", [(48, 40), (1500, 1300)])  # (the second: the randomized path)
def test_exact_low_rank_update_is_recovered_at_energy_one(shape):
    m, s = _rank_k(*shape, k=5, decay=0.7)
    t = spectra.truncate(m.float(), energy=1 - 1e-9)
    assert t.rank == 5
    torch.testing.assert_close(t.b.double() @ t.a.double(), m, atol=1e-5, rtol=0)
    torch.testing.assert_close(t.s.double(), s, atol=1e-5, rtol=1e-5)
    assert t.energy == pytest.approx(1.0, abs=1e-9)
    assert t.max_sv == pytest.approx(3.0, rel=1e-5)
    # the split is symmetric: ‖B‖_F = ‖A‖_F = sqrt(Σ s)
    assert float(t.b.norm()) == pytest.approx(float(t.a.norm()), rel=1e-5)


def test_energy_picks_the_smallest_rank_that_keeps_it():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert spectra.rank_for_energy(s, 16 / 22) == 1
    assert spectra.rank_for_energy(s, 16 / 22 + 1e-6) == 2
    assert spectra.rank_for_energy(s, 21 / 22) == 3
    assert spectra.rank_for_energy(s, 1.0) == 4
    assert spectra.rank_for_energy(torch.zeros(3), 0.9) == 0
    assert spectra.energy_at(s, 2) == pytest.approx(20 / 22)


def test_truncation_at_a_rank_is_eckart_young():
    m, _ = _rank_k(30, 20, k=8, decay=0.5)
    t = spectra.truncate(m.float(), rank=3)
    u, s, vh = torch.linalg.svd(m)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(t.b.double() @ t.a.double(), best, atol=1e-5, rtol=0)
    assert t.energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-6)
    assert spectra.truncate(torch.zeros(4, 5), rank=2).rank == 0
    assert spectra.truncate(m.float(), rank=100).rank == 20  # (capped at min(out, in))


@pytest.mark.parametrize(
    "rank,energy", [(None, None), (2, 0.5), (0, None), (-1, None), (1.5, None), (None, 0.0), (None, 1.5)]
)
def test_bad_requests_are_named(rank, energy):
    with pytest.raises(ValueError, match="rank|energy"):
        spectra.truncate(torch.ones(3, 3), rank=rank, energy=energy)


def test_ranks_of_spectra():
    assert spectra.effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert spectra.effective_rank(torch.tensor([5.0, 0.0])) == pytest.approx(1.0)
    p = torch.tensor([3.0, 1.0]) / 4
    assert spectra.effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(p * p.log()).sum()))
    assert spectra.stable_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(6 / 4)
    assert spectra.stable_rank(torch.zeros(2)) == 0.0


def test_subspace_similarity_is_one_for_one_subspace_and_matches_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64))
    phi = spectra.subspace_similarity(q, q)
    assert torch.allclose(torch.diagonal(phi), torch.ones(4, dtype=torch.float64))
    # q's first two columns against a basis whose first column is q's first: phi(1, 1) = 1,
    # phi(2, 1) = 1 (span{q0} is inside span{q0, q1}), phi(2, 2) = (1 + c²) / 2 for the
    # second column's overlap c with q1
    c = 0.6
    other = torch.stack([q[:, 0], c * q[:, 1] + 0.8 * q[:, 2]], 1)
    phi = spectra.subspace_similarity(q[:, :2], other)
    assert phi[0, 0] == pytest.approx(1.0)
    assert phi[1, 0] == pytest.approx(1.0)
    assert phi[0, 1] == pytest.approx(1.0)
    assert phi[1, 1] == pytest.approx((1 + c**2) / 2)
    # the row space of A: a rank-2 A written in another basis spans the same subspace
    a = torch.randn(2, 10, generator=g, dtype=torch.float64)
    mix = torch.tensor([[2.0, 1.0], [0.5, -1.0]], dtype=torch.float64)
    phi = spectra.subspace_similarity(spectra.right_basis(a), spectra.right_basis(mix @ a))
    assert phi[1, 1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bases of one space"):
        spectra.subspace_similarity(q, torch.ones(9, 2))


def test_amplification_factor_by_hand():
    # W = diag(10, 1, 1); ΔW = 2·e1 e1ᵀ (a direction W has with weight 1): factor 2 / 1
    w = torch.diag(torch.tensor([10.0, 1.0, 1.0]))
    d = torch.zeros(3, 3)
    d[1, 1] = 2.0
    assert spectra.amplification_factor(d, w) == pytest.approx(2.0)
    d2 = torch.zeros(3, 3)
    d2[0, 0] = 2.0  # along W's top direction: 2 / 10
    assert spectra.amplification_factor(d2, w) == pytest.approx(0.2)
    assert spectra.amplification_factor(torch.zeros(3, 3), w) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        spectra.amplification_factor(d, torch.ones(3, 4))


def test_delta_of_conv_layout():
    a, b = torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1)
    d = spectra.delta_of(a, b, 0.5)
    assert d.shape == (5, 27)
    torch.testing.assert_close(d, 0.5 * b.reshape(5, 2) @ a.reshape(2, 27))


@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (50, 50)])
def test_gram_svd_equals_lapack(shape):
    g = torch.Generator().manual_seed(3)
    m = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -3, shape[1], dtype=torch.float64)
    )
    u, s, vh = spectra.gram_svd(m)
    u0, s0, vh0 = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(s, s0, atol=1e-10 * float(s0[0]), rtol=0)
    torch.testing.assert_close((u * s) @ vh, m, atol=1e-10, rtol=0)
    for k in (1, 5, 20):  # the rank-k truncation: the same matrix (Eckart–Young's)
        exact = (u0[:, :k] * s0[:k]) @ vh0[:k]
        torch.testing.assert_close((u[:, :k] * s[:k]) @ vh[:k], exact, atol=1e-9, rtol=0)
