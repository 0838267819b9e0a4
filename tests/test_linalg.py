"""``singular_triplets`` (the fp64 Gram route of the SVD inits) against ``torch.linalg.svd`` in fp64,
and OLoRA's first-r-columns QR against the full QR."""

from __future__ import annotations

import pytest
import torch

from lorafit.inits.svd import qr_factors
from lorafit.linalg import singular_triplets

R = 6


def reference(W: torch.Tensor, r: int, minor: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    picked = slice(len(S) - r, len(S)) if minor else slice(0, r)
    return U[:, picked], S[picked], Vh[picked].T


def aligned(U: torch.Tensor, V: torch.Tensor, V0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with each (u_i, v_i) pair's sign chosen to match the reference's v_i."""
    signs = torch.sign((V.double() * V0).sum(0))
    return U.double() * signs, V.double() * signs


def matrix(shape: tuple[int, int], spectrum: torch.Tensor) -> torch.Tensor:
    """A seeded fp32 matrix with the given singular values (distinct, so its triplets are unique up to sign)."""
    gen = torch.Generator().manual_seed(sum(shape))
    k = len(spectrum)
    Q1, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64))
    return ((Q1 * spectrum) @ Q2.T).float()


@pytest.mark.parametrize("minor", [False, True], ids=["top", "bottom"])
@pytest.mark.parametrize("shape", [(90, 40), (40, 90), (50, 50)], ids=["tall", "wide", "square"])
def test_triplets_match_the_fp64_svd(shape: tuple[int, int], minor: bool) -> None:
    # singular values 1 … 0.01, log-spaced (κ = 100): the reference's triplets are well separated.
    # Catches the wrong end (top for bottom), a missing flip (ascending S), V and U swapped on a
    # wide matrix, U not normalised by S (U = W V), and S = λ instead of √λ.
    W = matrix(shape, torch.logspace(0, -2, min(shape), dtype=torch.float64))
    U, S, V = singular_triplets(W, R, minor)
    U0, S0, V0 = reference(W, R, minor)
    assert U.shape == (shape[0], R) and S.shape == (R,) and V.shape == (shape[1], R)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert torch.allclose(S.double(), S0, rtol=1e-6, atol=0)
    U, V = aligned(U, V, V0)
    assert (V - V0).abs().max() < 1e-5 and (U - U0).abs().max() < 1e-5


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)], ids=["tall", "wide"])
def test_bottom_triplets_of_an_ill_conditioned_matrix(shape: tuple[int, int]) -> None:
    # κ = 10⁶: the Gram squares it to 10¹², still inside fp64. S_r = ‖W v_i‖ keeps the bottom singular
    # values to ~ε₆₄·σ₁, so to fp32 rounding (rtol 1e-6; √λ would be off by ~ε₆₄·σ₁²/σ_r ≈ 10⁻¹⁰,
    # 10⁻⁴ relative), and the vectors stay within 1e-3 of the fp64 SVD's, where an fp32 SVD's are off
    # by 0.1–1 (the bottom σ's are below its ε₃₂·σ₁ accuracy in relative gap terms).
    W = matrix(shape, torch.logspace(0, -6, min(shape), dtype=torch.float64))
    U, S, V = singular_triplets(W, R, minor=True)
    U0, S0, V0 = reference(W, R, minor=True)
    assert torch.allclose(S.double(), S0, rtol=1e-6, atol=0)
    U, V = aligned(U, V, V0)
    assert (V - V0).abs().max() < 1e-3 and (U - U0).abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)], ids=["tall", "wide"])
def test_rank_deficient_matrix(shape: tuple[int, int]) -> None:
    # rank 20 < min(shape): the top triplets are unique, the bottom ones (σ = 0) any orthonormal basis of
    # the null space — so the bottom product U S Vᵀ must vanish, and the residual W − U S Vᵀ stays W.
    spectrum = torch.cat([torch.logspace(0, -1, 20, dtype=torch.float64), torch.zeros(min(shape) - 20, dtype=torch.float64)])
    W = matrix(shape, spectrum)
    U, S, V = singular_triplets(W, R)
    U0, S0, V0 = reference(W, R, minor=False)
    assert torch.allclose(S.double(), S0, rtol=1e-6, atol=0)
    U, V = aligned(U, V, V0)
    assert (V - V0).abs().max() < 1e-5 and (U - U0).abs().max() < 1e-5
    U, S, V = singular_triplets(W, R, minor=True)
    assert S.abs().max() < 1e-6 and torch.isfinite(U).all() and torch.isfinite(V).all()
    assert ((U * S) @ V.T).abs().max() < 1e-6
    X = U if shape[0] < shape[1] else V         # the eigenvectors' side: orthonormal, in W's null space
    assert ((X.T @ X) - torch.eye(R)).abs().max() < 1e-5
    assert ((W.T if shape[0] < shape[1] else W).double() @ X.double()).abs().max() < 1e-6


def test_fp64_input_is_refused() -> None:
    with pytest.raises(TypeError, match="fp64"):
        singular_triplets(torch.eye(4, dtype=torch.float64), 2)


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)], ids=["tall", "wide"])
def test_olora_qr_from_the_first_columns_is_the_full_qr(shape: tuple[int, int]) -> None:
    # catches A = Q_rᵀ W with the wrong side (W Q_r), R's first r columns dropped, or B = Q of all columns
    W = matrix(shape, torch.logspace(0, -2, min(shape), dtype=torch.float64))
    A, B = qr_factors(W, R)
    Q, Rf = torch.linalg.qr(W.double())
    assert A.shape == (R, shape[1]) and B.shape == (shape[0], R)
    assert (B.double() - Q[:, :R]).abs().max() < 1e-5           # Householder signs: the same as the full QR
    assert (A.double() - Rf[:R]).abs().max() < 1e-5
    assert torch.equal(A[:, :R].tril(-1), torch.zeros(R, R))   # R_rr exactly upper triangular
