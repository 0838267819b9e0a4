"""The top or bottom r singular triplets of a big matrix, in about one Gram matrix of memory.

``torch.linalg.svd(W, full_matrices=False)`` on an m×n layer (m ≥ n) holds a copy of W, U (m×n),
Vᵀ (n×n) and LAPACK's workspace: about four times the layer (issue 17). The PiSSA/MiLoRA inits and
Spectral adapters need r ≪ n triplets, so :func:`singular_triplets` takes them from the Gram matrix
of the smaller side instead (for m ≥ n):

    G = WᵀW (n×n, fp64, summed over row chunks of W: no fp64 copy of W),
    V_r = the eigenvectors of G for its r largest (or smallest) eigenvalues,
    Y = W V_r (m×r, fp64),   S_r = ‖Y_:,i‖,   U_r = Y / S_r

(``W Wᵀ`` and the roles of U and V swapped when m < n). On the CPU only those r eigenvectors are
computed (scipy's ``eigh(subset_by_index=…)``, LAPACK ``dsyevr``: workspace O(n)); elsewhere
``torch.linalg.eigh`` computes all of them on the device.

Accuracy. The Gram squares the condition number, but in fp64: with exact fp32 entries (their
products are exact in fp64) G and its eigenvectors carry errors of about ε₆₄·σ₁², so v_i is off by
about ε₆₄·σ₁²/(σ_i² − σ_j²), where an fp32 SVD is off by ε₃₂·σ₁/|σ_i − σ_j|: the ratio is
(ε₆₄/ε₃₂)·σ₁/(σ_i + σ_j) ≈ 2·10⁻⁹·σ₁/σ_i, below 1 for every σ_i above 2·10⁻⁹·σ₁ — and an fp32
matrix's singular triplets below ε₃₂·σ₁ ≈ 6·10⁻⁸·σ₁ are set by the rounding of its entries anyway.
S_r = ‖W v_i‖ (not √λ_i, which is off by ε₆₄·σ₁²/σ_i) is within about ε₆₄·σ₁ of σ_i. So for inputs
of fp32 precision or less the result is at least as accurate as an fp32 SVD; an fp64 input is
refused (it would get fp32 accuracy). A zero ‖W v_i‖ gives a zero column of U (of V when m < n).

W may also be a :class:`Rows` — a matrix read a block of rows at a time, as a 4-bit layer's weight
is dequantised (:class:`lorafit.quant.Rows4bit`) — so a quantised layer is never held dense: only
G, its eigenvectors, Y and a few row blocks are. WᵀW (m ≥ n) and Y = W V_r are summed over row
chunks as for a tensor; W Wᵀ (m < n) from blocks of rows, ``G[a:b, c:d] = W[a:b] W[c:d]ᵀ`` over
the lower triangle (``GRAM_BLOCKS`` row blocks, two of them alive: a quarter of W in fp32; W read
about ``GRAM_BLOCKS/2`` times), and ``Y = Wᵀ U_r = Σ W[a:b]ᵀ U_r[a:b]``. Only the order of the fp64
sums differs from the tensor's path.
"""

from __future__ import annotations

from typing import Protocol, Union

import torch

CHUNK_ELEMENTS = 2 ** 18       # fp64 rows (or columns) of W converted at a time: 2 MiB
GRAM_BLOCKS = 8                # row blocks of a wide Rows for W Wᵀ: two alive, a quarter of W


class Rows(Protocol):
    """An m×n matrix read a block of rows at a time (``rows(a, b)`` = ``W[a:b]``, a new fp32 tensor)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def rows(self, start: int, stop: int) -> torch.Tensor: ...


Matrix = Union[torch.Tensor, Rows]


def _rows(W: Matrix, start: int, stop: int) -> torch.Tensor:
    """``W[start:stop]`` of a tensor or a :class:`Rows`."""
    return W[start:stop] if isinstance(W, torch.Tensor) else W.rows(start, stop)


def gram(W: Matrix) -> torch.Tensor:
    """``WᵀW`` (m ≥ n) or ``W Wᵀ`` (m < n) in fp64, built from chunks of the longer side (of a wide
    :class:`Rows`, from blocks of rows: :func:`_gram_row_blocks`)."""
    wide = W.shape[0] < W.shape[1]
    if wide and not isinstance(W, torch.Tensor):
        return _gram_row_blocks(W)
    k = min(W.shape)
    G = torch.zeros(k, k, dtype=torch.float64, device=W.device)
    step = max(1, CHUNK_ELEMENTS // k)
    for i in range(0, max(W.shape), step):
        part = (W[:, i:i + step].T if wide else _rows(W, i, i + step)).double()   # (chunk, k)
        G.addmm_(part.T, part)
    return G


def _gram_row_blocks(W: Rows) -> torch.Tensor:
    """``W Wᵀ`` (fp64) of a wide :class:`Rows`: ``G[a:b, c:d] = W[a:b] W[c:d]ᵀ`` for c ≤ a, mirrored.

    Two blocks of rows (fp32) are alive at a time, each product summed over fp64 column pieces of
    about ``CHUNK_ELEMENTS``; W is read ``GRAM_BLOCKS·(GRAM_BLOCKS+1)/2`` blocks' worth in all.
    """
    m, n = W.shape
    G = torch.zeros(m, m, dtype=torch.float64, device=W.device)
    step = -(-m // GRAM_BLOCKS)
    for a in range(0, m, step):
        Wa = W.rows(a, min(a + step, m))
        for c in range(0, a + 1, step):
            Wc = Wa if c == a else W.rows(c, min(c + step, m))
            block = G[a:a + len(Wa), c:c + len(Wc)]
            cols = max(1, CHUNK_ELEMENTS // len(Wa))
            for j in range(0, n, cols):
                block.addmm_(Wa[:, j:j + cols].double(), Wc[:, j:j + cols].double().T)
            if c != a:
                G[c:c + len(Wc), a:a + len(Wa)] = block.T
            del Wc
    return G


def _eigenvectors(G: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """The eigenvectors of the symmetric ``G`` for its eigenvalues ``first..last`` (ascending order)."""
    if G.device.type == "cpu":
        import scipy.linalg
        # G is symmetric, so its transpose (Fortran order) is G itself: overwritten in place, no copy
        _, Q = scipy.linalg.eigh(G.numpy().T, subset_by_index=(first, last), driver="evr",
                                 overwrite_a=True, check_finite=False)
        return torch.from_numpy(Q)
    return torch.linalg.eigh(G).eigenvectors[:, first:last + 1]


@torch.no_grad()
def singular_triplets(W: Matrix, r: int, minor: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, V_r)`` of ``W`` (m×n, a tensor or a :class:`Rows`): its r largest (``minor``:
    smallest) singular triplets.

    ``W ≈ U diag(S) Vᵀ`` restricted to those r: U is m×r, S (r,) in descending order, V n×r, all in
    W's dtype, as ``torch.linalg.svd``'s ``U[:, :r], S[:r], Vh[:r].T`` (or the last r) up to the sign
    of each (u_i, v_i) pair.
    """
    if W.dtype == torch.float64:
        raise TypeError("singular_triplets is accurate to fp32 (see lorafit.linalg); use torch.linalg.svd for fp64")
    k = min(W.shape)
    if not 1 <= r <= k:
        raise ValueError(f"r={r} singular triplets asked of a {W.shape[0]}×{W.shape[1]} matrix")
    wide = W.shape[0] < W.shape[1]
    first = 0 if minor else k - r
    X = _eigenvectors(gram(W), first, first + r - 1).flip(1).to(W.device)   # descending
    Y = _transposed_times(W, X) if wide else _times_rows(W, X)     # X holds W's (Wᵀ's) right vectors
    S = Y.norm(dim=0)
    Y /= S.clamp_min(torch.finfo(S.dtype).tiny)
    U, V = (X, Y) if wide else (Y, X)
    return U.to(W.dtype), S.to(W.dtype), V.to(W.dtype)


def _times_rows(W: Matrix, X: torch.Tensor) -> torch.Tensor:
    """``W X`` (fp64) from row chunks of W."""
    step = max(1, CHUNK_ELEMENTS // W.shape[1])
    return torch.cat([_rows(W, i, i + step).double() @ X for i in range(0, W.shape[0], step)])


def _transposed_times(W: Matrix, X: torch.Tensor) -> torch.Tensor:
    """``Wᵀ X`` (fp64): from column chunks of a tensor, summed over row chunks of a :class:`Rows`."""
    if isinstance(W, torch.Tensor):
        return _times_rows(W.T, X)
    Y = torch.zeros(W.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    step = max(1, CHUNK_ELEMENTS // W.shape[1])
    for i in range(0, W.shape[0], step):
        Y.addmm_(W.rows(i, i + step).double().T, X[i:i + step])
    return Y
